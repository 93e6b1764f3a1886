//! Wire protocols: tensors, Open Inference Protocol v2, KServe V1.

pub mod tensor;
pub mod v1;
pub mod v2;
