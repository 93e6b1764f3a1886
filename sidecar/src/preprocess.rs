//! Built-in pre-processing: PNG/JPEG bytes → resized, converted, normalised tensor of one row,
//! `value = (pixel * scale - mean[c]) / std[c]`, pixels optionally inverted first.

use image::imageops::FilterType;
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

/// Decodes `bytes` and builds the model input of type `dt` (FP32 or FP64).
pub fn image_to_tensor(
    cfg: &ImagePreprocess,
    bytes: &[u8],
    dt: DatumType,
) -> RequestResult<Tensor> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| RequestError::Malformed(format!("cannot decode image: {e}")))?;
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

    #[test]
    fn grayscale_flat_recovers_scaled_values() {
        let cfg: ImagePreprocess = serde_json::from_value(serde_json::json!({
            "width": 2, "height": 2, "layout": "Flat", "scale": 1.0 / 15.0
        }))
        .expect("cfg");
        let t =
            image_to_tensor(&cfg, &png(2, 2, vec![0, 15, 150, 240]), DatumType::F32).expect("t");
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
        let t =
            image_to_tensor(&rgb, &png(2, 2, vec![0, 15, 150, 240]), DatumType::F32).expect("t");
        assert_eq!(t.shape(), &[1, 3, 3, 4]);
        assert!(image_to_tensor(&cfg, b"not an image", DatumType::F32).is_err());
        assert!(image_to_tensor(&cfg, &png(2, 2, vec![0; 4]), DatumType::I64).is_err());
    }
}
