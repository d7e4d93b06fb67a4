//! Prepared execs: everything an `exec` needs is built in advance, so the exec itself (and the
//! few syscalls around it) can run anywhere, including inside a fatal-signal handler, which may
//! not allocate.
//!
//! The same plan serves the three execs of a live update: the old VMM executing the
//! cpr-exec-command, the shim executing the new VMM, and a rollback executing the previous VMM
//! from its preserved fd.

use std::ffi::{CString, OsStr};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;

use crate::fds;

/// What to execute.
#[derive(Debug)]
pub enum ExecTarget {
    /// A path; without a '/', searched in PATH like a shell would (not signal-safe).
    Path(CString),
    /// An open executable (`execveat(fd, "", AT_EMPTY_PATH)`), immune to its path being replaced.
    Fd(RawFd),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error("empty command: nothing to execute")]
    Empty,
}

/// A ready-to-run exec.
#[derive(Debug)]
pub struct ExecPlan {
    target: ExecTarget,
    program: String,
    // The CStrings own the bytes the pointer arrays point at; both live as long as the plan.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    /// fds to make inheritable just before the exec.
    inherit: Vec<RawFd>,
    /// Bytes to store in a memfd (the CPR channel) just before the exec.
    channel: Option<(RawFd, Vec<u8>)>,
}

// SAFETY: the raw pointers point into CStrings owned by the same plan and are never written
// through; sharing a plan between threads (or with a signal handler) only reads them.
unsafe impl Send for ExecPlan {}
// SAFETY: see above; all methods take &self and only read.
unsafe impl Sync for ExecPlan {}

fn cstring(what: &str, bytes: &[u8]) -> Result<CString, ExecError> {
    CString::new(bytes).map_err(|_| ExecError::Nul {
        what: what.to_string(),
    })
}

impl ExecPlan {
    /// `argv[0]` is passed as given; `env_set` entries replace (or add to) this process's
    /// environment, and `env_remove` names are dropped from it.
    pub fn new(
        target: ExecTarget,
        argv: &[String],
        env_set: &[(&str, String)],
        env_remove: &[&str],
        inherit: Vec<RawFd>,
    ) -> Result<Self, ExecError> {
        if argv.is_empty() {
            return Err(ExecError::Empty);
        }
        let program = match &target {
            ExecTarget::Path(p) => p.to_string_lossy().into_owned(),
            ExecTarget::Fd(fd) => format!("fd {fd} ({})", argv[0]),
        };
        let argv_c = argv
            .iter()
            .map(|a| cstring("an argument", a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env_c = Vec::new();
        for (key, value) in std::env::vars_os() {
            let k = key.as_bytes();
            if env_set.iter().any(|(name, _)| name.as_bytes() == k)
                || env_remove.iter().any(|name| name.as_bytes() == k)
            {
                continue;
            }
            let mut entry = k.to_vec();
            entry.push(b'=');
            entry.extend_from_slice(OsStr::new(&value).as_bytes());
            env_c.push(cstring("an environment variable", &entry)?);
        }
        for (name, value) in env_set {
            env_c.push(cstring(name, format!("{name}={value}").as_bytes())?);
        }
        let argv_ptrs = null_terminated(&argv_c);
        let env_ptrs = null_terminated(&env_c);
        Ok(ExecPlan {
            target,
            program,
            _argv: argv_c,
            argv_ptrs,
            _env: env_c,
            env_ptrs,
            inherit,
            channel: None,
        })
    }

    /// Writes `content` into the memfd `fd` (replacing what it held) just before the exec.
    pub fn with_channel_content(mut self, fd: RawFd, content: Vec<u8>) -> Self {
        self.channel = Some((fd, content));
        self
    }

    /// What is executed, for messages.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Makes the inherited fds inheritable, stores the channel content, and executes. Returns
    /// only if the exec failed, with its error. Async-signal-safe: only fcntl, ftruncate, pwrite
    /// and the exec syscall on memory prepared in advance.
    pub fn exec(&self) -> std::io::Error {
        if let Some((fd, content)) = &self.channel {
            // SAFETY: plain syscalls on an fd number with a buffer owned by the plan; failures
            // surface when the receiver validates the channel.
            unsafe {
                libc::ftruncate(*fd, 0);
                libc::pwrite(*fd, content.as_ptr().cast(), content.len(), 0);
            }
        }
        for fd in &self.inherit {
            let _ = fds::set_cloexec(*fd, false);
        }
        match &self.target {
            ExecTarget::Path(path) => {
                // SAFETY: path, argv and envp are NUL-terminated strings in NULL-terminated
                // arrays owned by the plan; exec only reads them.
                unsafe {
                    if path.as_bytes().contains(&b'/') {
                        libc::execve(
                            path.as_ptr(),
                            self.argv_ptrs.as_ptr(),
                            self.env_ptrs.as_ptr(),
                        );
                    } else {
                        libc::execvpe(
                            path.as_ptr(),
                            self.argv_ptrs.as_ptr(),
                            self.env_ptrs.as_ptr(),
                        );
                    }
                }
            }
            ExecTarget::Fd(fd) => {
                // SAFETY: as above; "" with AT_EMPTY_PATH executes the file `fd` refers to.
                unsafe {
                    libc::execveat(
                        *fd,
                        c"".as_ptr(),
                        self.argv_ptrs.as_ptr().cast(),
                        self.env_ptrs.as_ptr().cast(),
                        libc::AT_EMPTY_PATH,
                    );
                }
            }
        }
        std::io::Error::last_os_error()
    }

    /// After a failed exec: makes the inherited fds close-on-exec again.
    pub fn restore_cloexec(&self) {
        for fd in &self.inherit {
            let _ = fds::set_cloexec(*fd, true);
        }
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_exec_reports_and_restores() {
        let (r, w) = nix::unistd::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let fd = w.as_raw_fd();
        let plan = ExecPlan::new(
            ExecTarget::Path(c"/nonexistent/program".into()),
            &["x".to_string()],
            &[("CPR_TEST", "1".into())],
            &[],
            vec![fd],
        )
        .unwrap();
        let err = plan.exec();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert!(!fds::is_cloexec(fd).unwrap());
        plan.restore_cloexec();
        assert!(fds::is_cloexec(fd).unwrap());
        drop(r);
    }

    #[test]
    fn rejects_nul_and_empty() {
        assert!(matches!(
            ExecPlan::new(ExecTarget::Fd(3), &[], &[], &[], vec![]),
            Err(ExecError::Empty)
        ));
        assert!(ExecPlan::new(ExecTarget::Fd(3), &["a\0b".into()], &[], &[], vec![]).is_err());
    }
}
