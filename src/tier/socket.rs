//! What waits for the invalidation channel's task, seen from a read about to answer from L1.
//!
//! A message (or the close) from Redis reaches the channel's socket before the connection's
//! task reads it, and the task applies a message only after reading it; on a busy process each
//! step can wait. On Linux, over plain TCP, the channel makes its own socket, and a read about
//! to answer from L1 looks at both steps:
//!
//! - the socket, through a second descriptor: `poll` tells a close apart even with unread bytes
//!   ahead of it, and a non-blocking `recv` with `MSG_PEEK` (which consumes nothing) shows the
//!   unread bytes, searched for the key;
//! - the task's reads, through the stream redis-rs is given ([`Watched`]): from the moment it
//!   may take bytes off the socket until it asks for more, which it does only once every whole
//!   message it read has been handled, what it took counts as unread.
//!
//! A message longer than what one read takes off the socket (its head in the task's buffer,
//! its tail on the socket) is the one case neither sees whole.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What may concern a key, unread or unapplied by the connection's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peek {
    /// Nothing: every message Redis sent has been read and applied.
    Quiet,
    /// Bytes not read yet, whole messages none of which names the key.
    Elsewhere,
    /// Something that may concern the key: unread bytes naming it, a flush, more than one look
    /// takes in, or bytes the task has read and not yet handled.
    Unread,
    /// The connection is closed (or reset); its task may not have seen it yet.
    Closed,
}

/// How many unread bytes one look takes in.
const PEEK_BYTES: usize = 4096;

/// The channel's socket as a read sees it: a second descriptor, and whether the connection's
/// task holds bytes it has not handled yet.
#[derive(Debug)]
pub(crate) struct Socket {
    stream: std::net::TcpStream,
    in_flight: Arc<AtomicBool>,
}

impl Socket {
    #[cfg(test)]
    pub(crate) fn new(stream: std::net::TcpStream) -> Socket {
        Socket {
            stream,
            in_flight: Arc::default(),
        }
    }

    /// Reads (consumes) what waits, as the connection's task would; how many bytes.
    #[cfg(test)]
    pub(crate) fn take_pending(&self) -> usize {
        use std::io::Read;
        let mut buf = [0u8; PEEK_BYTES];
        (&self.stream).read(&mut buf).unwrap_or(0)
    }

    /// Ends the connection (both descriptors): for a connection given up.
    pub(crate) fn shut(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// What may concern `key` now. The socket is looked at first and the task's state after:
    /// bytes the task takes off the socket in between are flagged before it takes them.
    pub(crate) fn peek(&self, key: &[u8]) -> Peek {
        let on_socket = self.on_socket(key);
        if matches!(on_socket, Peek::Unread | Peek::Closed) {
            return on_socket;
        }
        if self.in_flight.load(Ordering::SeqCst) {
            return Peek::Unread;
        }
        on_socket
    }

    #[cfg(target_os = "linux")]
    fn on_socket(&self, key: &[u8]) -> Peek {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.stream, PollFlags::IN | PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // An error (a signal) tells nothing, so nothing is trusted for this read.
        let Ok(ready) = poll(&mut fds, Some(&now)) else {
            return Peek::Unread;
        };
        if ready == 0 {
            return Peek::Quiet;
        }
        let events = fds[0].revents();
        if events.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
            return Peek::Closed;
        }
        let mut pending = [0u8; PEEK_BYTES];
        match self.stream.peek(&mut pending) {
            Ok(0) => Peek::Closed,
            Ok(n) if n == PEEK_BYTES || concerns(&pending[..n], key) => Peek::Unread,
            Ok(_) => Peek::Elsewhere,
            // Taken by the task meanwhile: `in_flight` says the rest.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Peek::Quiet,
            Err(_) => Peek::Unread,
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn on_socket(&self, _key: &[u8]) -> Peek {
        Peek::Quiet
    }
}

/// Whether unread bytes of the channel may concern `key`: they name it (a key it is a prefix
/// of counts too), or they hold a flush (`invalidate` with a null: every key).
fn concerns(pending: &[u8], key: &[u8]) -> bool {
    contains(pending, key) || contains(pending, b"invalidate\r\n_")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The stream the connection's task reads and writes. `in_flight` is raised before each read
/// of the socket and lowered when the read took nothing; redis-rs reads again only once every
/// whole message from the last read has been decoded and handed to the push handler, so while
/// it is up, bytes taken off the socket may not have been applied.
pub(crate) struct Watched {
    stream: tokio::net::TcpStream,
    in_flight: Arc<AtomicBool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.in_flight.store(true, Ordering::SeqCst);
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let took = matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        if !took {
            self.in_flight.store(false, Ordering::SeqCst);
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connected TCP stream split into what the task gets and what reads look at.
pub(crate) fn watch(stream: tokio::net::TcpStream) -> io::Result<(Watched, Arc<Socket>)> {
    // Tokio's socket is non-blocking, and so is the duplicate (they share the open file).
    let stream = stream.into_std()?;
    let in_flight = Arc::new(AtomicBool::new(false));
    let socket = Arc::new(Socket {
        stream: stream.try_clone()?,
        in_flight: in_flight.clone(),
    });
    let watched = Watched {
        stream: tokio::net::TcpStream::from_std(stream)?,
        in_flight,
    };
    Ok((watched, socket))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use tokio::io::AsyncReadExt;

    use super::{Peek, Socket, concerns, contains, watch};

    /// Waits (up to 2 s) until `socket` shows `want` for `key`.
    fn until(socket: &Socket, key: &[u8], want: Peek) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let seen = socket.peek(key);
            if seen == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "saw {seen:?}, waited for {want:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn what_waits_on_the_socket_or_in_the_task_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut redis, _) = listener.accept().unwrap();
        let (mut watched, socket) = watch(stream).unwrap();
        assert_eq!(socket.peek(b"app:a:1"), Peek::Quiet);

        redis
            .write_all(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\napp:a:1\r\n")
            .unwrap();
        until(&socket, b"app:a:1", Peek::Unread);
        assert_eq!(socket.peek(b"app:b:1"), Peek::Elsewhere);

        // The task takes the message off the socket: until it asks for more, it is in flight.
        let mut buf = [0u8; 256];
        let n = watched.read(&mut buf).await.unwrap();
        assert!(n > 0);
        assert_eq!(
            socket.peek(b"app:a:1"),
            Peek::Unread,
            "taken, not yet handled"
        );
        assert_eq!(
            socket.peek(b"app:b:1"),
            Peek::Unread,
            "its keys are not known"
        );
        // It asks for more and finds nothing: everything it took was handled.
        let more = tokio::time::timeout(Duration::from_millis(20), watched.read(&mut buf)).await;
        assert!(more.is_err(), "nothing more was sent");
        assert_eq!(socket.peek(b"app:a:1"), Peek::Quiet);

        // A close behind unread bytes that name no key is a close.
        redis.write_all(b"+PONG\r\n").unwrap();
        drop(redis);
        until(&socket, b"app:a:1", Peek::Closed);
    }

    #[test]
    fn a_pending_message_concerns_the_keys_it_names_and_a_flush_every_key() {
        let message = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$7\r\napp:a:1\r\n$8\r\napp:b:22\r\n";
        assert!(concerns(message, b"app:a:1"));
        assert!(concerns(message, b"app:b:22"));
        assert!(
            concerns(message, b"app:b:2"),
            "a prefix of a named key counts"
        );
        assert!(!concerns(message, b"app:a:2"));
        assert!(!concerns(message, b"app:c:1"));
        let flush = b">2\r\n$10\r\ninvalidate\r\n_\r\n";
        assert!(concerns(flush, b"app:c:1"));
        let pong = b"+PONG\r\n";
        assert!(!concerns(pong, b"app:a:1"));
    }

    #[test]
    fn contains_finds_needles_anywhere_and_only_whole() {
        assert!(contains(b"abc", b""));
        assert!(contains(b"aab", b"ab"));
        assert!(contains(b"xxab", b"ab"));
        assert!(!contains(b"xxa", b"ab"));
        assert!(!contains(b"", b"a"));
        assert!(contains(b"a", b"a"));
    }
}
