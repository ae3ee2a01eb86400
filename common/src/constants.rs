//! The one place for shared defaults, limits and names.
//!
//! Anything both binaries must agree on (chunk sizes, tensor name prefixes, feature layout)
//! is defined here and nowhere else.

/// Largest payload carried by one `TensorChunk` unless configured otherwise (1 MiB).
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 1 << 20;
/// Smallest chunk size a peer may ask for; protects against a flood of tiny messages.
pub const MIN_CHUNK_BYTES: usize = 4 << 10;
/// Upper bound on a whole model payload accepted from the wire (1 GiB).
pub const MAX_MODEL_BYTES: u64 = 1 << 30;
/// gRPC message ceiling: one chunk plus framing overhead.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 16 << 20;
/// HTTP/2 flow-control windows of the coordinator (receiving uploads). h2's default (64 KiB)
/// stalls a 1 MiB chunk 16 times on window updates; measured on loopback, a 94 MiB upload took
/// 3× longer. They also bound what each upload may buffer unread, which keeps the
/// coordinator's memory flat in the number of sites.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 1 << 20;
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 2 << 20;
/// The site's windows (receiving the global model): one download at a time, so wider.
pub const SITE_HTTP2_STREAM_WINDOW_BYTES: u32 = 4 << 20;
pub const SITE_HTTP2_CONNECTION_WINDOW_BYTES: u32 = 8 << 20;
/// Most uploads the coordinator decodes at once (one per core, at least 2): the rest wait
/// with one stream window buffered, so memory stays flat in the number of sites.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// Grad-CAM overlays a site computes per class (test patients), and the most a site may send.
pub const GRADCAM_PER_CLASS: usize = 2;
pub const MAX_GRADCAMS_PER_SITE: usize = 16;
/// Largest Grad-CAM PNG accepted.
pub const MAX_GRADCAM_BYTES: usize = 256 << 10;

/// Batches of local training data a site runs (train-mode BatchNorm, no gradients) to
/// re-estimate BatchNorm statistics before extracting features under differential privacy.
pub const BN_RECALIBRATION_BATCHES: usize = 16;

/// Rows per `FeatureBatch` message.
pub const FEATURE_ROWS_PER_BATCH: usize = 256;

/// Path prefix of the shared ResNet50 trunk inside the model; the rest of each name is
/// torchvision's `state_dict` key (`conv1.weight`, `layer4.2.bn3.running_var`, ...).
pub const TRUNK_PREFIX: &str = "trunk";
/// Path prefix of the three-layer classification head.
pub const HEAD_PREFIX: &str = "head";
/// Names of the head's three fully connected layers, input to output.
pub const HEAD_LAYERS: [&str; 3] = ["fc1", "fc2", "fc3"];
/// Width of the pooled ResNet50 output for one modality.
pub const TRUNK_FEATURES: usize = 2048;
/// Default width of the first FC layer of the head.
pub const DEFAULT_HIDDEN_DIM: usize = 256;
/// Default width of the penultimate FC layer, i.e. of the deep-feature vector.
pub const DEFAULT_DEEP_FEATURE_DIM: usize = 64;

/// ImageNet channel means and standard deviations used to normalise crops.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Default coordinator port.
pub const DEFAULT_PORT: u16 = 50051;
/// Pause a site is told to wait between polls when nothing is to be done.
pub const DEFAULT_WAIT_MS: u32 = 500;

/// File names inside a coordinator state directory.
pub mod state_files {
    pub const ROUND_STATE: &str = "round_state.json";
    pub const MODELS_DIR: &str = "models";
    pub const REPORT_JSON: &str = "report.json";
    pub const REPORT_HTML: &str = "report.html";
    pub const FEATURES_CSV: &str = "features.csv";
}

/// Name of the global model file after `round` rounds (round 0 is the initial model).
pub fn global_model_file(round: u32) -> String {
    format!("global_r{round:04}.safetensors")
}

/// Name of the local update file a site keeps of what it sent for `round`.
pub fn local_update_file(round: u32) -> String {
    format!("local_r{round:04}.safetensors")
}

/// Suffixes of BatchNorm running statistics in the model state. They are averaged like
/// weights (every site then evaluates with one complete model) but are not gradients, so
/// server optimisers (FedAdam / FedYogi) apply their plain mean instead of an Adam step.
pub const RUNNING_STATISTIC_SUFFIXES: [&str; 2] = ["running_mean", "running_var"];

/// Whether tensor `name` is a BatchNorm running statistic.
pub fn is_running_statistic(name: &str) -> bool {
    RUNNING_STATISTIC_SUFFIXES.iter().any(|s| name.ends_with(s))
}
