//! The access log's writer: one thread that empties every worker's channel, formats
//! the records and writes them in batches, and reopens the file on request (SIGUSR1,
//! after logrotate renamed it). It may block (a slow disk, a full pipe); the workers
//! never wait for it, they drop what their channel cannot hold.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use prometheus::IntCounter;

use super::format::Formatter;
use super::{Record, WorkerLog, RECORDS_PER_WORKER};
use crate::config::{Config, LogTarget};
use crate::metrics::{AccessLogResult, Metrics};

/// How often a writer with work looks for records: short enough that a record is on
/// disk within a blink of its close, long enough that a busy log is written in
/// batches of many records per write(2).
const BUSY_TICK: Duration = Duration::from_millis(10);
/// An idle writer backs off to this, so an idle server's log costs ten wake-ups a
/// second.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// A batch is written once it holds this many bytes (a few hundred records).
const BATCH_BYTES: usize = 64 * 1024;
/// How long stopping waits for the writer to write what is left. A writer blocked on
/// a full pipe is left to end by itself when the write returns.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Failed writes are logged at most this often (each failure is counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

enum Control {
    /// Reopen the file; answer when done (true if the new file is in use).
    Reopen(Sender<bool>),
    /// Write what is left and exit.
    Stop,
}

/// The running access log: the writer thread and the workers' channels.
pub struct AccessLog {
    control: Sender<Control>,
    /// Worker i's sending end, taken by [`AccessLog::worker`].
    senders: Vec<Sender<Record>>,
    /// Where a worker whose buffer fills up wakes the writer.
    nudge: Sender<()>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread has returned.
    exited: Receiver<()>,
}

impl AccessLog {
    /// Opens the log `config.access_log` names and starts its writer; None when the
    /// log is off. An error names the file.
    pub fn start(config: &Config, metrics: &Arc<Metrics>) -> io::Result<Option<AccessLog>> {
        let Some(target) = config.access_log.target.clone() else {
            return Ok(None);
        };
        let sink = Sink::open(target)?;
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.workers)
            .map(|_| crossbeam_channel::bounded(RECORDS_PER_WORKER))
            .unzip();
        let (control, commands) = crossbeam_channel::unbounded();
        // One nudge waiting is as good as many.
        let (nudge, nudges) = crossbeam_channel::bounded(1);
        let (exiting, exited) = crossbeam_channel::bounded::<()>(0);
        let mut writer = Writer {
            sink,
            receivers,
            commands,
            nudges,
            _nudge: nudge.clone(),
            formatter: Formatter::new(config.access_log.format, config.http.status),
            batch: Vec::with_capacity(BATCH_BYTES + 4096),
            in_batch: 0,
            written: metrics.access_log(AccessLogResult::Written),
            dropped: metrics.access_log(AccessLogResult::Dropped),
            last_warning: None,
        };
        let thread = std::thread::Builder::new()
            .name("edgepoll-log".into())
            .spawn(move || {
                let _exiting = exiting;
                writer.run();
            })?;
        tracing::info!(
            "access log to {} ({}{})",
            match &config.access_log.target {
                Some(LogTarget::File(p)) => p.display().to_string(),
                _ => "stderr".into(),
            },
            config.access_log.format.as_str(),
            if config.access_log.sample < 1.0 {
                format!(", clean closes sampled at {}", config.access_log.sample)
            } else {
                String::new()
            }
        );
        Ok(Some(AccessLog {
            control,
            senders,
            nudge,
            thread: Some(thread),
            exited,
        }))
    }

    /// Worker `id`'s side of the log; `listeners`: the server's listening addresses
    /// as bound.
    pub fn worker(
        &self,
        id: usize,
        config: &Config,
        listeners: &[SocketAddr],
    ) -> Option<WorkerLog> {
        let tx = self.senders.get(id)?.clone();
        Some(WorkerLog::new(
            tx,
            self.nudge.clone(),
            id,
            config,
            listeners,
        ))
    }

    /// Reopens the file (after logrotate renamed it): records written before this
    /// returns went to the old file, later ones go to the new. Waits up to a second
    /// for the writer (it may be blocked on the disk); false if the reopen failed, did
    /// not happen in that time, or there is no file (stderr).
    pub fn reopen(&self) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.control.send(Control::Reopen(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(Duration::from_secs(1)).unwrap_or(false)
    }
}

impl Drop for AccessLog {
    /// Writes what the workers left (they have stopped by now) and stops the writer.
    fn drop(&mut self) {
        self.senders.clear();
        let _ = self.control.send(Control::Stop);
        match self.exited.recv_timeout(STOP_WAIT) {
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!("the access log writer is blocked on a write; leaving it behind");
            }
            _ => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Where records are written.
enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Sink {
    fn open(target: LogTarget) -> io::Result<Sink> {
        Ok(match target {
            LogTarget::Stderr => Sink::Stderr,
            LogTarget::File(path) => {
                let file = open(&path)?;
                Sink::File { path, file }
            }
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            // Whole batches under the lock, so that edgepoll's own log lines never
            // land inside a record.
            Sink::Stderr => io::stderr().lock().write_all(bytes),
            Sink::File { file, path } => file
                .write_all(bytes)
                .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", path.display()))),
        }
    }
}

/// Opens `path` for appending, creating it (mode 0644, as nginx's logs) if needed.
/// O_APPEND keeps every batch whole even while the process a reload started writes
/// to the same file.
fn open(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))
}

struct Writer {
    sink: Sink,
    receivers: Vec<Receiver<Record>>,
    commands: Receiver<Control>,
    /// A worker's buffer is filling: empty it before the tick.
    nudges: Receiver<()>,
    /// Keeps `nudges` connected once the workers are gone, so that waiting on it
    /// never returns at once.
    _nudge: Sender<()>,
    formatter: Formatter,
    /// Formatted records not yet written.
    batch: Vec<u8>,
    in_batch: u64,
    written: IntCounter,
    dropped: IntCounter,
    last_warning: Option<Instant>,
}

impl Writer {
    fn run(&mut self) {
        let mut tick = BUSY_TICK;
        loop {
            let found = self.take_all();
            tick = if found > 0 {
                BUSY_TICK
            } else {
                (tick * 2).min(IDLE_TICK)
            };
            crossbeam_channel::select! {
                recv(self.commands) -> command => match command {
                    Ok(Control::Reopen(done)) => {
                        self.take_all();
                        let _ = done.send(self.reopen());
                    }
                    Ok(Control::Stop) | Err(_) => {
                        self.take_all();
                        return;
                    }
                },
                recv(self.nudges) -> _ => tick = BUSY_TICK,
                default(tick) => {}
            }
        }
    }

    /// Formats and writes every record waiting; returns how many there were.
    fn take_all(&mut self) -> u64 {
        let mut found = 0;
        for i in 0..self.receivers.len() {
            while let Ok(record) = self.receivers[i].try_recv() {
                self.formatter.write(&record, &mut self.batch);
                self.in_batch += 1;
                found += 1;
                if self.batch.len() >= BATCH_BYTES {
                    self.flush();
                }
            }
        }
        self.flush();
        found
    }

    /// Writes the batch; its records count as written, or as dropped if the write
    /// failed (a full disk, a closed pipe).
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        match self.sink.write_all(&self.batch) {
            Ok(()) => self.written.inc_by(self.in_batch),
            Err(e) => {
                self.dropped.inc_by(self.in_batch);
                if self
                    .last_warning
                    .is_none_or(|at| at.elapsed() >= WARN_EVERY)
                {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(
                        "access log: {e}; {} records dropped (counted in \
                         edgepoll_access_log_records_total{{result=\"dropped\"}})",
                        self.in_batch
                    );
                }
            }
        }
        self.batch.clear();
        self.in_batch = 0;
    }

    /// Opens the file's path anew; false if it failed (the old file stays in use)
    /// or there is no file (stderr is not reopened).
    fn reopen(&mut self) -> bool {
        let Sink::File { path, file } = &mut self.sink else {
            return false;
        };
        match open(path) {
            Ok(new) => {
                *file = new;
                tracing::info!("access log reopened: {}", path.display());
                true
            }
            Err(e) => {
                tracing::error!("access log: {e}; still writing to the file opened before");
                false
            }
        }
    }
}
