//! edgepoll's own log lines (`tracing`) on stderr: those of the serving threads
//! (workers, acceptor, probes) written by a thread of their own (`edgepoll-stderr`),
//! so that none of them ever waits on stderr.
//!
//! stderr is often a pipe (journald, a container's log driver) that can fill, and
//! with `--access-log stderr` the access log's writer fills it first, blocked in a
//! write with stderr's lock held. A worker that then logged a warning straight to
//! stderr stopped serving until the reader caught up, if ever. Here a line is handed
//! to a bounded channel and dropped when that is full: a line that cannot be written
//! is worth less than the connections a blocked worker would stop serving.
//!
//! The main thread, which serves nothing, writes its own lines itself, after those
//! queued before them: a line it logs before it acts (a reload's "is serving;
//! handing over") must reach stderr before what the act causes, such as the next
//! process's "reloaded: took over" on the same stderr.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tracing_subscriber::fmt::MakeWriter;

/// Lines held for the thread: a burst of warnings from every worker at once fits.
const LINES: usize = 4096;

/// How long [`flush`] waits for the lines before it to be written: a stderr nobody
/// reads must not keep the process from exiting.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line sent before it is written.
    Flush(Sender<()>),
}

static THREAD: OnceLock<Sender<Msg>> = OnceLock::new();

/// The writer `tracing_subscriber::fmt` formats each line into; see the module doc.
#[derive(Clone)]
pub struct Stderr {
    tx: Sender<Msg>,
}

impl Stderr {
    /// Starts the thread (once per process; later calls share it). It inherits the
    /// caller's signal mask: the binary blocks its signals first, so that none is
    /// delivered to this thread.
    pub fn start() -> io::Result<Stderr> {
        if let Some(tx) = THREAD.get() {
            return Ok(Stderr { tx: tx.clone() });
        }
        let (tx, rx) = crossbeam_channel::bounded(LINES);
        std::thread::Builder::new()
            .name("edgepoll-stderr".into())
            .spawn(move || write_lines(rx))?;
        let tx = THREAD.get_or_init(|| tx).clone();
        Ok(Stderr { tx })
    }
}

fn write_lines(rx: Receiver<Msg>) {
    for msg in rx {
        match msg {
            // Under the lock, so a line never lands inside an access log batch.
            Msg::Line(line) => {
                let _ = io::stderr().lock().write_all(&line);
            }
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Waits (at most [`FLUSH_WAIT`]) until every line logged so far is written: before
/// the process exits, or prints to stderr itself.
pub fn flush() {
    let Some(tx) = THREAD.get() else {
        return;
    };
    let (done, written) = crossbeam_channel::bounded(1);
    if tx.send_timeout(Msg::Flush(done), FLUSH_WAIT).is_ok() {
        let _ = written.recv_timeout(FLUSH_WAIT);
    }
}

/// One line being formatted.
pub struct Line<'a> {
    buf: Vec<u8>,
    tx: &'a Sender<Msg>,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    /// The line is complete: offered to the thread, dropped if it is full; the main
    /// thread's is written now, after the lines queued before it.
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if std::thread::current().name() == Some("main") {
            flush();
            let _ = io::stderr().lock().write_all(&self.buf);
        } else {
            let _ = self.tx.try_send(Msg::Line(std::mem::take(&mut self.buf)));
        }
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            buf: Vec::new(),
            tx: &self.tx,
        }
    }
}
