//! A stack of undo steps run in reverse order on every path out of a launch (the
//! firecracker-go-sdk habit): each resource is registered right after it is created, so an
//! error at any later step — or a panic — still removes everything created before it.

type Step = Box<dyn FnOnce() -> Result<(), String>>;

pub struct Cleanup {
    steps: Vec<(String, Step)>,
}

impl Default for Cleanup {
    fn default() -> Self {
        Self::new()
    }
}

impl Cleanup {
    pub fn new() -> Cleanup {
        Cleanup { steps: Vec::new() }
    }

    pub fn push(
        &mut self,
        what: impl Into<String>,
        f: impl FnOnce() -> Result<(), String> + 'static,
    ) {
        self.steps.push((what.into(), Box::new(f)));
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Run every step, last registered first. A failing step does not stop the others; the
    /// failures are returned (and logged).
    pub fn run(mut self) -> Vec<String> {
        self.run_inner()
    }

    fn run_inner(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some((what, f)) = self.steps.pop() {
            tracing::debug!("cleanup: {what}");
            if let Err(e) = f() {
                tracing::warn!("cleanup: {what}: {e}");
                errors.push(format!("{what}: {e}"));
            }
        }
        errors
    }

    /// Drop every step without running it (the parent side of a fork hands them to the
    /// child).
    pub fn disarm(mut self) {
        let steps = std::mem::take(&mut self.steps);
        // The closures own nothing that must not be dropped in the parent.
        drop(steps);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.steps.is_empty() {
            self.run_inner();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn reverse_order_on_run_drop_and_panic() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut c = Cleanup::new();
        for i in 0..3 {
            let l = log.clone();
            c.push(format!("step {i}"), move || {
                l.borrow_mut().push(i);
                if i == 1 {
                    Err("boom".into())
                } else {
                    Ok(())
                }
            });
        }
        let errs = c.run();
        assert_eq!(*log.borrow(), vec![2, 1, 0]);
        assert_eq!(errs, vec!["step 1: boom".to_string()]);

        let hit = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hit.clone();
        let r = std::panic::catch_unwind(move || {
            let mut c = Cleanup::new();
            c.push("count", move || {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            });
            panic!("mid-launch");
        });
        assert!(r.is_err());
        assert_eq!(hit.load(std::sync::atomic::Ordering::SeqCst), 1);

        let l = log.clone();
        let mut c = Cleanup::new();
        c.push("never", move || {
            l.borrow_mut().push(99);
            Ok(())
        });
        c.disarm();
        assert!(!log.borrow().contains(&99));
    }
}
