//! Folder fsyncs shared by concurrent publishes.
//!
//! A publish fsyncs the products folder it renamed into, the temporaries' folder it
//! renamed out of, and the staged folder it removed from. Publishes in flight together
//! mostly name the same few folders, and one fsync of a folder makes durable every change
//! made to it before that fsync began. So a caller whose change is made either starts an
//! fsync of the folder, when none is running, or waits for the one that starts after the
//! running one: everybody who arrives while an fsync runs shares the next. No caller is
//! answered by an fsync that began before its change.
//!
//! [`step`] is the rule, a pure function of a folder's state; [`DirSyncs`] does the
//! waiting and the fsync around it.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

/// Which folder: device, inode, and the path it was reached by (on file systems such as
/// overlayfs, device and inode alone may name two folders).
pub type FolderId = (u64, u64, std::path::PathBuf);

/// One folder's fsyncs, numbered from 1.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Folder {
    /// The last fsync begun.
    pub started: u64,
    /// The last fsync finished (`started - 1` while one runs).
    pub done: u64,
    /// The last fsync that failed, with its error (kind and text), if any did.
    pub failed: Option<(u64, std::io::ErrorKind, String)>,
    /// Callers waiting for a later fsync.
    pub waiting: usize,
}

impl Folder {
    fn running(&self) -> bool {
        self.started > self.done
    }

    /// The fsync a caller arriving now needs: the first that begins after it arrives.
    pub fn needed(&self) -> u64 {
        self.started + 1
    }
}

/// What a caller needing fsync `need` does next.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// An fsync that began after its change has finished: this is its outcome.
    Done(Result<(), (std::io::ErrorKind, String)>),
    /// Nobody is syncing: it runs fsync number `need` itself.
    Run(u64),
    /// One is running that may have begun before its change: wait for it to end.
    Wait,
}

/// The rule: done once fsync `need` (or a later one) has finished, with the error of any
/// that failed from `need` on; else run it when none is running; else wait.
pub fn step(folder: &Folder, need: u64) -> Step {
    if folder.done >= need {
        return Step::Done(match &folder.failed {
            Some((n, kind, text)) if *n >= need => Err((*kind, text.clone())),
            _ => Ok(()),
        });
    }
    if folder.running() {
        Step::Wait
    } else {
        Step::Run(folder.started + 1)
    }
}

/// The folders being synced, shared by every publish of one publisher.
#[derive(Default)]
pub struct DirSyncs {
    folders: Mutex<HashMap<FolderId, Folder>>,
    ended: Condvar,
}

impl DirSyncs {
    /// Makes every change made to folder `id` before this call durable: by `fsync` (run
    /// here, or by a caller that began it after this call).
    pub fn sync(
        &self,
        id: FolderId,
        fsync: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        let need = folders.entry(id.clone()).or_default().needed();
        let mut fsync = Some(fsync);
        loop {
            let folder = folders.entry(id.clone()).or_default();
            match step(folder, need) {
                Step::Done(outcome) => {
                    if !folder.running() && folder.waiting == 0 {
                        folders.remove(&id);
                    }
                    return outcome.map_err(|(kind, text)| std::io::Error::new(kind, text));
                }
                Step::Run(n) => {
                    folder.started = n;
                    drop(folders);
                    let run = fsync.take().expect("a caller runs at most one fsync");
                    let outcome = run();
                    folders = self.folders.lock().unwrap_or_else(|e| e.into_inner());
                    let folder = folders.entry(id.clone()).or_default();
                    folder.done = n;
                    if let Err(e) = &outcome {
                        folder.failed = Some((n, e.kind(), e.to_string()));
                    }
                    if folder.waiting == 0 {
                        folders.remove(&id);
                    }
                    self.ended.notify_all();
                    return outcome;
                }
                Step::Wait => {
                    folder.waiting += 1;
                    folders = self.ended.wait(folders).unwrap_or_else(|e| e.into_inner());
                    folders.entry(id.clone()).or_default().waiting -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn a_caller_runs_an_fsync_when_none_runs_and_waits_for_the_next_when_one_does() {
        let idle = Folder::default();
        assert_eq!(step(&idle, idle.needed()), Step::Run(1));
        // Fsync 1 runs: a caller arriving now needs 2, which cannot start yet.
        let running = Folder {
            started: 1,
            done: 0,
            ..Folder::default()
        };
        assert_eq!(running.needed(), 2);
        assert_eq!(step(&running, 2), Step::Wait);
        // 1 ended: the first waiter runs 2, the others wait for it, then all are done.
        let ended = Folder {
            started: 1,
            done: 1,
            waiting: 3,
            ..Folder::default()
        };
        assert_eq!(step(&ended, 2), Step::Run(2));
        let second = Folder {
            started: 2,
            done: 1,
            waiting: 2,
            ..Folder::default()
        };
        assert_eq!(step(&second, 2), Step::Wait);
        let both = Folder {
            started: 2,
            done: 2,
            ..Folder::default()
        };
        assert_eq!(step(&both, 2), Step::Done(Ok(())));
    }

    #[test]
    fn a_failed_fsync_fails_the_callers_it_answers_and_not_those_after_it() {
        let failed = Folder {
            started: 3,
            done: 3,
            failed: Some((3, std::io::ErrorKind::Other, "EIO".into())),
            waiting: 0,
        };
        // Callers needing 3, and one needing 2 that only looks now: answered by the
        // failure (an fsync that failed may have dropped what it was writing).
        assert_eq!(
            step(&failed, 3),
            Step::Done(Err((std::io::ErrorKind::Other, "EIO".into())))
        );
        assert_eq!(
            step(&failed, 2),
            Step::Done(Err((std::io::ErrorKind::Other, "EIO".into())))
        );
        // The next fsync runs, and its callers get its own outcome.
        assert_eq!(step(&failed, failed.needed()), Step::Run(4));
        let recovered = Folder {
            started: 4,
            done: 4,
            ..failed
        };
        assert_eq!(step(&recovered, 4), Step::Done(Ok(())));
    }

    /// Real threads and a slow "fsync": every caller's change is covered by an fsync that
    /// began after it, and callers arriving together share fsyncs.
    #[test]
    fn concurrent_callers_share_fsyncs_and_each_is_covered_by_one_begun_after_its_change() {
        let syncs = Arc::new(DirSyncs::default());
        // Each "change" takes a number; an fsync covers every change numbered below the
        // counter's value when it began.
        let changes = Arc::new(AtomicU64::new(0));
        let covered = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (syncs, changes, covered, runs) = (
                    syncs.clone(),
                    changes.clone(),
                    covered.clone(),
                    runs.clone(),
                );
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let mine = changes.fetch_add(1, Ordering::SeqCst);
                        syncs
                            .sync((1, 2, "/f".into()), || {
                                let upto = changes.load(Ordering::SeqCst);
                                runs.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(1));
                                covered.fetch_max(upto, Ordering::SeqCst);
                                Ok(())
                            })
                            .unwrap();
                        assert!(
                            covered.load(Ordering::SeqCst) > mine,
                            "change {mine} answered before an fsync covered it"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let runs = runs.load(Ordering::SeqCst);
        assert!(runs < 320, "320 syncs asked for, {runs} run: none shared");
        assert!(
            syncs.folders.lock().unwrap().is_empty(),
            "a finished folder is forgotten"
        );
    }
}
