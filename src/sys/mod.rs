//! The process and namespace mechanics both backends share: capabilities, entering a network
//! namespace, the per-namespace lock and the deferral of termination signals.
//!
//! Effects: system calls only (no program is run).

pub mod caps;
pub mod guard;
pub mod netns;

/// Reads a small `/proc` file whole, in as few system calls as the kernel allows: procfs
/// files report a size of 0, so `std::fs::read_to_string` sizes them with a `statx` and then
/// grows its buffer from 32 bytes, read by read (eight reads for a thread's `status`); here
/// one page-sized read normally takes all of it, and one more confirms the end.
pub fn read_proc(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(2 * len, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
