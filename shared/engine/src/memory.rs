//! The memory a local model's weights are held in: the file's mapping where the page cache
//! holds it in huge pages, otherwise the whole file read into one buffer of huge pages. The
//! kernels read either in place.

use std::fs::File;
use std::io;

/// The file mapped read-only, advised into huge pages: where the page cache takes large folios
/// (ext4 on Linux 6.18 does), a fault in an advised mapping reads the file ahead in folios of 2
/// MiB, which it maps whole. AMD Zen 4 VM, Llama 3.2 1B-shape Q4_K_M (778 MiB), out of the page
/// cache and every page touched: all its whole 2 MiB pages mapped so advised, 736 MiB
/// unadvised.
pub(crate) fn map(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: the file is not written while it is mapped (downloads are written under a
    // temporary name and renamed into place).
    let map = unsafe { memmap2::Mmap::map(file) }?;
    #[cfg(target_os = "linux")]
    // A system without huge pages refuses the advice, harmlessly.
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

/// Whether a file's [`map`]ping lies in huge pages once every page of it is faulted in
/// (`MADV_POPULATE_READ`, Linux 5.14): seven eighths of its whole 2 MiB pages or more, by its
/// `FilePmdMapped` in `/proc/self/smaps`. Then the kernels read it as fast as a copy in a
/// [`weights_buffer`], and the copy's cost at load is saved (Zen 4 VM, `llm bench`, three
/// rounds in turn, one thread, load s: TinyLlama-shape Q4_K_M 1.59–1.70 → 0.05–0.08, Llama 3.2
/// 1B-shape Q8_0 1.81–2.02 → 0.26–0.35; decode tok/s 30.5–32.6 against 30.8–32.7 and 14.8–15.7
/// against 13.7–16.1). How the page cache holds a file depends on its history: read in by faults
/// or by `read`, in large folios (94–95 % of it mapped in huge pages unadvised); just written
/// (a `cp`'s copy), in small ones (none); and on that VM the large folios did not last: files
/// read in whole were down to 56–72 % minutes later, after other runs.
#[cfg(target_os = "linux")]
pub(crate) fn mapped_in_huge_pages(map: &[u8]) -> bool {
    let whole = whole_pages(map, HUGE_PAGE_BYTES).len();
    // SAFETY: the range is a mapping of this process's, starting on a page; populating it only
    // faults its pages in, as reading them would.
    let populated = whole > 0 && unsafe { libc::madvise(map.as_ptr() as *mut libc::c_void, map.len(), libc::MADV_POPULATE_READ) } == 0;
    let huge = || field_of_mapping_at(map.as_ptr() as usize, "FilePmdMapped:")?.trim().strip_suffix("kB")?.trim().parse::<usize>().ok();
    populated && huge().is_some_and(|kib| kib << 10 >= whole / 8 * 7)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn mapped_in_huge_pages(_: &[u8]) -> bool {
    false
}

/// The value of `field` (e.g. `VmFlags:`) of the mapping that holds `address`, from
/// `/proc/self/smaps`.
#[cfg(target_os = "linux")]
fn field_of_mapping_at(address: usize, field: &str) -> Option<String> {
    let mut holds = false;
    for line in std::fs::read_to_string("/proc/self/smaps").ok()?.lines() {
        match line.split_once(' ') {
            // A mapping's first line: `start-end permissions offset ...`.
            Some((range, _)) if !range.ends_with(':') => {
                let (start, end) = range.split_once('-')?;
                holds = (usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?).contains(&address);
            }
            _ if holds && line.starts_with(field) => return Some(line[field.len()..].to_string()),
            _ => {}
        }
    }
    None
}

/// A zeroed buffer of `len` bytes for a model's file, in huge pages where the system gives them
/// on request (Linux's transparent huge pages in their `madvise` mode). A decode step reads
/// every weight once, from memory, and reads it fastest from huge pages: every 2 MiB of it one
/// page, in one piece of physical memory, with one TLB entry. AMD Zen 4 VM, `compare.py`,
/// decode tok/s at one thread, the file mapped in pages of 4 KiB (28 of the 1B shape's 778 MiB
/// in huge ones) → read into huge pages: Llama 3.2 1B-shape Q4_K_M 24.6 → 27.3 (0.95 → 1.05 ×
/// llama.cpp), TinyLlama-shape Q4_K_M 30.3 → 33.4, Q4_0 32.7 → 34.4, Q8_0 18.5 → 19.8. Read into
/// pages of 4 KiB, the 1B shape decoded as fast as in huge pages in some rounds and no faster
/// than mapped in others (`llm bench`, rounds in turn: 26.8–27.6 against 27.0–27.3, and
/// 24.9–25.2 against 26.8–28.1, mapped 25.7–25.9), by what the allocator had free; in huge
/// pages it was fast in every round. The price is at load: the pages are zeroed and filled
/// (0.04 → 0.54 s for TinyLlama's Q4_K_M at one thread, up to 3.2 s for the 1B shape's Q8_0, on
/// a VM whose memory the host backs at first touch; 0.3–0.9 s when it was touched before; in
/// pages of 4 KiB 0.6–0.7 s).
///
/// A download from S3 (`llm_api`) stays in pages of 4 KiB: advised into huge pages there, a
/// cold start from the local S3 server loaded in 1.48–1.58 s instead of 0.94–0.96 (1B-shape
/// Q4_K_M; load ÷ plain GET 0.56–0.59 → 0.94–1.18, over the 1.1 × target) for a warm decode of
/// 48.4–52.4 tok/s instead of 46.4–47.8 at two threads. Advised once downloaded, its pages were
/// all collapsed into huge ones by `khugepaged` within nine minutes, for 28.3–28.9 tok/s against
/// 28.1–28.6 at one thread.
pub(crate) fn weights_buffer(len: usize) -> Vec<u8> {
    let bytes = vec![0u8; len];
    #[cfg(target_os = "linux")]
    if let Some(pages) = own_pages(&bytes, HUGE_PAGE_BYTES) {
        // SAFETY: the range is whole pages of the buffer's own mapping, not touched yet; the
        // advice only changes the size of the pages it is backed with. A system without huge
        // pages refuses or ignores it, harmlessly.
        unsafe { libc::madvise(pages.as_ptr() as *mut libc::c_void, pages.len(), libc::MADV_HUGEPAGE) };
    }
    bytes
}

#[cfg(target_os = "linux")]
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// The whole pages, of `page` bytes, inside `bytes`, if it has a mapping of its own: glibc maps
/// every allocation over 32 MiB by itself (`crate::allocator`). Advice on part of the heap would
/// stay there after the buffer is freed, on memory malloc hands out again.
#[cfg(target_os = "linux")]
pub(crate) fn own_pages(bytes: &[u8], page: usize) -> Option<&[u8]> {
    const OWN_MAPPING: usize = 64 << 20;
    (bytes.len() >= OWN_MAPPING).then(|| whole_pages(bytes, page))
}

/// The whole pages, of `page` bytes, inside `bytes` (empty if none is).
#[cfg(target_os = "linux")]
fn whole_pages(bytes: &[u8], page: usize) -> &[u8] {
    let address = bytes.as_ptr() as usize;
    let start = (address.next_multiple_of(page) - address).min(bytes.len());
    let end = ((address + bytes.len()) / page * page).saturating_sub(address).max(start);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A buffer of its own mapping is asked for in huge pages (`hg` among its mapping's flags),
    /// where the kernel has transparent huge pages at all.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_weights_buffer_is_advised_into_huge_pages() {
        if !Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return;
        }
        let buffer = weights_buffer(80 << 20);
        let flags = field_of_mapping_at(buffer.as_ptr() as usize + buffer.len() / 2, "VmFlags:").expect("a mapping holds the buffer");
        assert!(flags.split_whitespace().any(|flag| flag == "hg"), "VmFlags:{flags}");
    }

    /// A mapping is taken as it is only when it lies in huge pages: a file of less than a huge
    /// page never is; one of 16 MiB when at least seven eighths of it are (its cached pages
    /// dropped first, so that the mapping reads it in: in huge pages where the file system
    /// caches large folios, as ext4 does on Linux 6.18). Every mapping is advised into huge pages.
    #[cfg(target_os = "linux")]
    #[test]
    fn only_a_file_mapped_in_huge_pages_is_kept_mapped() {
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join(format!("llm-engine-map-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 100 << 10]).unwrap();
        let small = map(&File::open(&path).unwrap()).unwrap();
        assert!(!mapped_in_huge_pages(&small), "100 KiB");
        if Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            let flags = field_of_mapping_at(small.as_ptr() as usize, "VmFlags:").expect("a mapping holds the file");
            assert!(flags.split_whitespace().any(|flag| flag == "hg"), "VmFlags:{flags}");
        }
        // A mapped file is not written: unmapped first.
        drop(small);
        std::fs::write(&path, vec![7u8; 16 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: advice on this process's own descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mapped = map(&file).unwrap();
        let kept = mapped_in_huge_pages(&mapped);
        let huge = field_of_mapping_at(mapped.as_ptr() as usize, "FilePmdMapped:").expect("smaps has the field");
        let kib: usize = huge.trim().trim_end_matches("kB").trim().parse().unwrap();
        // An unaligned mapping has no page mapped whole (its offsets and the file's differ).
        assert_eq!(kept, kib >= 14 << 10, "FilePmdMapped:{huge}");
        assert_eq!(mapped[(16 << 20) - 1], 7);
        std::fs::remove_file(&path).unwrap();
    }
}
