//! Built-in pre-processing: PNG/JPEG bytes → resized, converted, normalised tensor of one row,
//! `value = (pixel * scale - mean[c]) / std[c]`, pixels optionally inverted first.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{ImageReader, Limits};
use serval_api::{ColorMode, ImagePreprocess, TensorLayout};
use tract_onnx::prelude::{DatumType, Tensor};

use crate::errors::{RequestError, RequestResult};

/// Shape of the one-row tensor `cfg` produces.
pub fn tensor_shape(cfg: &ImagePreprocess) -> Vec<usize> {
    let channels = match cfg.color {
        ColorMode::Grayscale => 1,
        ColorMode::Rgb => 3,
    };
    let (w, h) = (cfg.width as usize, cfg.height as usize);
    match cfg.layout {
        TensorLayout::Nchw => vec![1, channels, h, w],
        TensorLayout::Nhwc => vec![1, h, w, channels],
        TensorLayout::Flat => vec![1, channels * h * w],
    }
}

/// An image's width and height, read from its header only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

fn reader(bytes: &[u8]) -> RequestResult<ImageReader<Cursor<&[u8]>>> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| RequestError::Malformed(format!("cannot read image: {e}")))
}

fn undecodable(e: impl std::fmt::Display) -> RequestError {
    RequestError::Malformed(format!("cannot decode image: {e}"))
}

/// Reads the image's size from its header, without decoding it, and refuses (413) one of more
/// than `max_pixels` pixels: a small file can declare a huge image (a decompression bomb).
pub fn check_image_size(
    bytes: &[u8],
    cfg: &ImagePreprocess,
    max_pixels: u64,
) -> RequestResult<ImageSize> {
    let (width, height) = reader(bytes)?.into_dimensions().map_err(undecodable)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(RequestError::TooLarge(format!(
            "image is {width}x{height} = {pixels} pixels, more than the {max_pixels} accepted \
             for this model's {}x{} input; resize it before sending",
            cfg.width, cfg.height
        )));
    }
    Ok(ImageSize { width, height })
}

/// Bytes a decoder may allocate for an image of `size`: 8 bytes a pixel (RGBA, 16 bits a
/// channel, the widest PNG) and 1 MiB for its tables.
fn decode_allowance(size: ImageSize) -> u64 {
    u64::from(size.width) * u64::from(size.height) * 8 + (1 << 20)
}

/// Decodes `bytes` (whose header said `size`, see [`check_image_size`]) and builds the model
/// input of type `dt` (FP32 or FP64). The decoder is held to that size and its allowance, so a
/// file whose data disagrees with its header cannot allocate more. CPU-heavy for a large
/// image: run it off the I/O threads.
pub fn image_to_tensor(
    cfg: &ImagePreprocess,
    bytes: &[u8],
    dt: DatumType,
    size: ImageSize,
) -> RequestResult<Tensor> {
    let mut limits = Limits::default();
    limits.max_image_width = Some(size.width);
    limits.max_image_height = Some(size.height);
    limits.max_alloc = Some(decode_allowance(size));
    let mut reader = reader(bytes)?;
    reader.limits(limits);
    let img = reader.decode().map_err(undecodable)?;
    let (w, h) = (cfg.width, cfg.height);
    let img = if img.width() == w && img.height() == h {
        img
    } else {
        img.resize_exact(w, h, FilterType::Triangle)
    };
    let (channels, pixels): (usize, Vec<u8>) = match cfg.color {
        ColorMode::Grayscale => (1, img.to_luma8().into_raw()),
        ColorMode::Rgb => (3, img.to_rgb8().into_raw()),
    };
    let (w, h) = (w as usize, h as usize);
    let value = |c: usize, p: u8| {
        let p = if cfg.invert { 255 - p } else { p };
        let mean = cfg.mean.get(c).copied().unwrap_or(0.0);
        let std = cfg.std.get(c).copied().unwrap_or(1.0);
        (f64::from(p) * cfg.scale - mean) / std
    };
    // `pixels` is HWC; produce CHW for Nchw and Flat, HWC for Nhwc.
    let mut values = Vec::with_capacity(channels * h * w);
    match cfg.layout {
        TensorLayout::Nhwc => {
            for (i, p) in pixels.iter().enumerate() {
                values.push(value(i % channels, *p));
            }
        }
        TensorLayout::Nchw | TensorLayout::Flat => {
            for c in 0..channels {
                for i in 0..h * w {
                    values.push(value(c, pixels[i * channels + c]));
                }
            }
        }
    }
    let shape = tensor_shape(cfg);
    let t = match dt {
        DatumType::F32 => Tensor::from_shape(
            &shape,
            &values.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        ),
        DatumType::F64 => Tensor::from_shape(&shape, &values),
        other => {
            return Err(RequestError::Unprocessable(format!(
                "image pre-processing feeds FP32 or FP64 inputs, the model takes {other:?}"
            )));
        }
    };
    t.map_err(|e| RequestError::Inference(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, pixels: Vec<u8>) -> Vec<u8> {
        let img = image::GrayImage::from_raw(w, h, pixels).expect("image");
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("png");
        out.into_inner()
    }

    fn to_tensor(cfg: &ImagePreprocess, bytes: &[u8], dt: DatumType) -> RequestResult<Tensor> {
        let size = check_image_size(bytes, cfg, 1 << 20)?;
        image_to_tensor(cfg, bytes, dt, size)
    }

    #[test]
    fn an_image_over_the_pixel_limit_is_refused_from_its_header() {
        let cfg: ImagePreprocess =
            serde_json::from_value(serde_json::json!({"width": 2, "height": 2})).expect("cfg");
        let img = png(4, 3, vec![7; 12]);
        assert_eq!(
            check_image_size(&img, &cfg, 12).expect("fits"),
            ImageSize {
                width: 4,
                height: 3
            }
        );
        let e = check_image_size(&img, &cfg, 11).expect_err("over the limit");
        assert!(matches!(e, RequestError::TooLarge(_)), "{e}");
        assert!(e.to_string().contains("4x3 = 12 pixels"), "{e}");
    }

    #[test]
    fn grayscale_flat_recovers_scaled_values() {
        let cfg: ImagePreprocess = serde_json::from_value(serde_json::json!({
            "width": 2, "height": 2, "layout": "Flat", "scale": 1.0 / 15.0
        }))
        .expect("cfg");
        let t = to_tensor(&cfg, &png(2, 2, vec![0, 15, 150, 240]), DatumType::F32).expect("t");
        assert_eq!(t.shape(), &[1, 4]);
        let v: Vec<f32> = t
            .to_plain_array_view::<f32>()
            .expect("f32")
            .iter()
            .copied()
            .collect();
        assert_eq!(v, vec![0.0, 1.0, 10.0, 16.0]);
        let rgb: ImagePreprocess = serde_json::from_value(serde_json::json!({
            "width": 4, "height": 3, "color": "Rgb", "layout": "Nchw", "invert": true,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]
        }))
        .expect("cfg");
        let t = to_tensor(&rgb, &png(2, 2, vec![0, 15, 150, 240]), DatumType::F32).expect("t");
        assert_eq!(t.shape(), &[1, 3, 3, 4]);
        assert!(to_tensor(&cfg, b"not an image", DatumType::F32).is_err());
        assert!(to_tensor(&cfg, &png(2, 2, vec![0; 4]), DatumType::I64).is_err());
    }
}
