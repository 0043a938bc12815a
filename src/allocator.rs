//! The binary's global allocator: jemalloc, built with an 8-byte quantum, so the small nodes
//! moka keeps per cached entry stop rounding up to the next 16-byte class (README "Memory per
//! cached entry" has the measured saving). Part of the binary, not the library: the library
//! has no `unsafe` code.

use std::alloc::{GlobalAlloc, Layout};

/// jemalloc (`tikv-jemallocator`), with layouts padded to their alignment.
///
/// jemalloc's size classes below 64 bytes are by default 16 bytes apart (16, 32, 48, 64), so
/// a node of 24, 40 or 56 bytes (moka has several per entry) takes 8 bytes more than it asks;
/// built with `--with-lg-quantum=3` (`JEMALLOC_SYS_WITH_LG_QUANTUM=3`, set for every build in
/// `.cargo/config.toml`) it also has classes of 24, 40 and 56 bytes, 16 bytes less per cached
/// entry measured. Those classes are only 8-byte aligned, which no Rust type minds (a type's
/// size is a multiple of its alignment, so one aligned to 16 is never 24, 40 or 56 bytes
/// long), but a hand-made `Layout` may be: this rounds such a layout's size up to its
/// alignment before jemalloc sees it, so it lands in a class whose blocks are aligned enough.
/// With jemalloc's default 16-byte quantum the rounding changes nothing.
pub struct Allocator;

/// The size jemalloc is asked for: `layout`'s, rounded up to its alignment when that is more
/// than the 8 bytes every class guarantees. It never overflows: a `Layout`'s size rounded up
/// to its alignment fits in `isize`.
fn padded(layout: Layout) -> Layout {
    if layout.align() <= 8 {
        layout
    } else {
        layout.pad_to_align()
    }
}

// SAFETY: every call goes to jemalloc with the padded layout, the same one on allocation,
// reallocation and release; padding only makes a block larger, never less aligned.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract holds for the padded layout too (non-zero size).
        unsafe { tikv_jemallocator::Jemalloc.alloc(padded(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(padded(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated here with the same padded layout.
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, padded(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = padded(layout);
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `ptr` was allocated here with `old`; the new size is the padded one.
        unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, old, padded(new).size()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_as_asked_even_for_sizes_between_classes() {
        for align in [1, 2, 4, 8, 16, 32, 64] {
            for size in [1, 7, 8, 9, 16, 23, 24, 25, 40, 41, 56, 57, 100, 1000, 5000] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; the block is released with the same layout.
                unsafe {
                    let ptr = Allocator.alloc(layout);
                    assert!(!ptr.is_null(), "{size} B at {align}: no block");
                    assert_eq!(ptr as usize % align, 0, "{size} B at {align}: misaligned");
                    ptr.write_bytes(0xa5, size);
                    let grown = Allocator.realloc(ptr, layout, size * 3);
                    assert!(!grown.is_null(), "{size} B at {align}: no larger block");
                    assert_eq!(grown as usize % align, 0, "{size} B grown: misaligned");
                    assert_eq!(*grown.add(size - 1), 0xa5, "realloc kept the bytes");
                    let grown_layout = Layout::from_size_align(size * 3, align).expect("layout");
                    Allocator.dealloc(grown, grown_layout);
                }
            }
        }
    }
}
