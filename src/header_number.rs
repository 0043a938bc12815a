//! Header values that are a whole number, made without an allocation when the number is
//! small. Every cache hit carries `Age`, and the rate-limit fields carry a limit and what
//! remains of it: `HeaderValue::from(u64)` formats each into a fresh heap buffer (an
//! allocation, a copy and a free later, some 190 instructions a value under callgrind). A
//! number below [`SMALL`] is a slice of one static table instead, which the value points
//! into, so making, cloning and dropping it touch no allocator and no reference count.

use bytes::Bytes;
use http::HeaderValue;

/// Numbers below this come from the table; larger ones are formatted as before.
pub const SMALL: u64 = 10_000;

/// `0000` to `9999`, four zero-padded digits each: a number's text is the tail of its slot.
static DIGITS: [u8; 4 * SMALL as usize] = {
    let mut table = [0u8; 4 * SMALL as usize];
    let mut n = 0;
    while n < SMALL as usize {
        table[4 * n] = b'0' + (n / 1000) as u8;
        table[4 * n + 1] = b'0' + (n / 100 % 10) as u8;
        table[4 * n + 2] = b'0' + (n / 10 % 10) as u8;
        table[4 * n + 3] = b'0' + (n % 10) as u8;
        n += 1;
    }
    table
};

/// `n` in decimal, as `HeaderValue::from(n)` writes it.
pub fn header_number(n: u64) -> HeaderValue {
    if n >= SMALL {
        return HeaderValue::from(n);
    }
    let slot = 4 * n as usize;
    let digits = match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        _ => 4,
    };
    let text = Bytes::from_static(&DIGITS[slot + 4 - digits..slot + 4]);
    HeaderValue::from_maybe_shared(text).unwrap_or_else(|_| HeaderValue::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_reads_as_the_formatted_one() {
        for n in (0..SMALL + 50).chain([u64::MAX, 1 << 40, 1_733_300_000]) {
            assert_eq!(header_number(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn a_small_number_points_into_the_table() {
        // A value of the table is `'static` text: the same bytes, not a fresh buffer.
        let v = header_number(1234);
        let table = DIGITS.as_ptr_range();
        assert!(table.contains(&v.as_bytes().as_ptr()), "1234 was copied");
        assert!(!table.contains(&header_number(SMALL).as_bytes().as_ptr()));
    }
}
