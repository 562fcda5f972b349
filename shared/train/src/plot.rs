//! The loss curve of a run as a PNG: training loss as a line, evaluation loss as dots, on
//! axes scaled to the run. Written with a tiny uncompressed PNG encoder, so the training
//! crate needs no image library.

use std::path::Path;

use crate::error::{Result, TrainError};

const WIDTH: usize = 640;
const HEIGHT: usize = 400;
const MARGIN: usize = 40;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const AXES: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];
const TRAIN: [u8; 3] = [31, 119, 180];
const EVAL: [u8; 3] = [214, 39, 40];

/// One step's point: `(step, loss, eval loss)`.
pub type Point = (usize, f64, Option<f64>);

pub fn write_loss_curve(points: &[Point], path: &Path) -> Result<()> {
    let png = encode_png(&draw(points), WIDTH, HEIGHT);
    std::fs::write(path, png).map_err(|e| TrainError::file(path, e))
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let at = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    /// A line two pixels thick (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, color);
            self.set(x, y + 1, color);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

fn draw(points: &[Point]) -> Vec<u8> {
    let mut canvas = Canvas { pixels: BACKGROUND.repeat(WIDTH * HEIGHT) };
    let (left, right, top, bottom) = (MARGIN as i64, (WIDTH - MARGIN) as i64, MARGIN as i64 / 2, (HEIGHT - MARGIN) as i64);
    for i in 1..5 {
        let y = top + (bottom - top) * i / 5;
        canvas.line((left, y), (right, y), GRID);
    }
    canvas.line((left, bottom), (right, bottom), AXES);
    canvas.line((left, top), (left, bottom), AXES);
    let values: Vec<f64> = points.iter().flat_map(|&(_, loss, eval)| std::iter::once(loss).chain(eval)).filter(|v| v.is_finite()).collect();
    let (Some(low), Some(high)) = (values.iter().copied().reduce(f64::min), values.iter().copied().reduce(f64::max)) else {
        return canvas.pixels;
    };
    let span = (high - low).max(1e-9);
    let last_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(2) as f64;
    let to_xy = |step: usize, loss: f64| {
        let x = left + ((step as f64 - 1.0) / (last_step - 1.0) * (right - left) as f64) as i64;
        let y = bottom - ((loss - low) / span * (bottom - top) as f64) as i64;
        (x, y)
    };
    for pair in points.windows(2) {
        canvas.line(to_xy(pair[0].0, pair[0].1), to_xy(pair[1].0, pair[1].1), TRAIN);
    }
    for &(step, _, eval) in points {
        if let Some(eval) = eval {
            let (x, y) = to_xy(step, eval);
            for (dx, dy) in (-3..=3).flat_map(|dx| (-3..=3).map(move |dy| (dx, dy))) {
                canvas.set(x + dx, y + dy, EVAL);
            }
        }
    }
    canvas.pixels
}

/// An 8-bit RGB PNG whose zlib stream holds stored (uncompressed) deflate blocks.
pub fn encode_png(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(height * (1 + width * 3));
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());

    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&(width as u32).to_be_bytes());
    header.extend_from_slice(&(height as u32).to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", header.as_slice()), (b"IDAT", zlib.as_slice()), (b"IEND", &[][..])] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + byte as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_their_standards() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
