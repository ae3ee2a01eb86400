//! The bimodal network: ONE ResNet50 trunk (shared weights) applied to the US crop and to
//! the SWE crop, pooled outputs concatenated (2 × 2048), then three Xavier-initialised FC
//! layers. The penultimate FC output (after ReLU) is the "deep feature" vector.
//!
//! Tensor names are `trunk.<torchvision key>` and `head.fc{1,2,3}.{weight,bias}`; the
//! whole `VarStore` — weights *and* BatchNorm running statistics — is exchanged and
//! averaged, so every site evaluates with the same global normalisation statistics
//! (FedBN-style local statistics would make the global model incomplete).

use std::collections::BTreeSet;
use std::path::Path;

use aln_common::constants::{HEAD_LAYERS, HEAD_PREFIX, TRUNK_FEATURES, TRUNK_PREFIX};
use aln_common::model_state::ModelState;
use anyhow::{Context, Result, anyhow, bail};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

/// Widths of the head: 4096 → hidden → feature → classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadDims {
    pub hidden: i64,
    pub feature: i64,
    pub classes: i64,
}

pub struct BimodalNet {
    pub vs: nn::VarStore,
    trunk: Box<dyn ModuleT>,
    fc1: nn::Linear,
    fc2: nn::Linear,
    fc3: nn::Linear,
    pub dims: HeadDims,
}

fn xavier_linear(p: nn::Path, fan_in: i64, fan_out: i64) -> nn::Linear {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    nn::linear(
        p,
        fan_in,
        fan_out,
        nn::LinearConfig { ws_init: nn::Init::Uniform { lo: -bound, up: bound }, bs_init: Some(nn::Init::Const(0.0)), bias: true },
    )
}

impl BimodalNet {
    pub fn new(device: Device, dims: HeadDims) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let trunk = Box::new(tch::vision::resnet::resnet50_no_final_layer(&(&root / TRUNK_PREFIX)));
        let head = &root / HEAD_PREFIX;
        let fc1 = xavier_linear(&head / HEAD_LAYERS[0], 2 * TRUNK_FEATURES as i64, dims.hidden);
        let fc2 = xavier_linear(&head / HEAD_LAYERS[1], dims.hidden, dims.feature);
        let fc3 = xavier_linear(&head / HEAD_LAYERS[2], dims.feature, dims.classes);
        Self { vs, trunk, fc1, fc2, fc3, dims }
    }

    /// Head widths implied by a model state's `head.fc*.weight` shapes.
    pub fn dims_of(state: &ModelState) -> Result<HeadDims> {
        let rows = |layer: &str| -> Result<i64> {
            let name = format!("{HEAD_PREFIX}.{layer}.weight");
            let spec = state.specs().iter().find(|s| s.name == name).ok_or_else(|| anyhow!("model has no tensor {name}"))?;
            Ok(spec.shape[0] as i64)
        };
        Ok(HeadDims { hidden: rows(HEAD_LAYERS[0])?, feature: rows(HEAD_LAYERS[1])?, classes: rows(HEAD_LAYERS[2])? })
    }

    /// Builds a network shaped like `state` and loads it.
    pub fn from_state(device: Device, state: &ModelState) -> Result<Self> {
        let mut net = Self::new(device, Self::dims_of(state)?);
        net.import(state)?;
        Ok(net)
    }

    /// `(logits, deep_features)` for a batch of US and SWE crops.
    pub fn forward_t(&self, us: &Tensor, swe: &Tensor, train: bool) -> (Tensor, Tensor) {
        let a = self.trunk.forward_t(us, train);
        let b = self.trunk.forward_t(swe, train);
        let x = Tensor::cat(&[a, b], 1);
        let h = self.fc1.forward(&x).relu().dropout(0.5, train);
        let deep = self.fc2.forward(&h).relu();
        let logits = self.fc3.forward(&deep);
        (logits, deep)
    }

    /// All variables as a canonical model state (sorted names, f32, CPU).
    pub fn export(&self) -> Result<ModelState> {
        let mut named = Vec::new();
        for (name, t) in self.vs.variables() {
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let values = Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
                .with_context(|| format!("reading tensor {name}"))?;
            named.push((name, shape, values));
        }
        Ok(ModelState::from_named(named)?)
    }

    /// Loads every variable from `state`; names and shapes must match exactly.
    pub fn import(&mut self, state: &ModelState) -> Result<()> {
        let vars = self.vs.variables();
        let mine: BTreeSet<&String> = vars.keys().collect();
        let theirs: BTreeSet<&String> = state.specs().iter().map(|s| &s.name).collect();
        if mine != theirs {
            let missing: Vec<_> = mine.difference(&theirs).take(5).collect();
            let extra: Vec<_> = theirs.difference(&mine).take(5).collect();
            bail!("model does not match the network: missing {missing:?}, unexpected {extra:?}");
        }
        let device = self.vs.device();
        tch::no_grad(|| -> Result<()> {
            for (spec, values) in state.tensors() {
                let mut var = vars[&spec.name].shallow_clone();
                let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
                if var.size() != shape {
                    bail!("tensor {}: network has {:?}, model has {:?}", spec.name, var.size(), shape);
                }
                var.copy_(&Tensor::from_slice(values).view(shape.as_slice()).to_device(device));
            }
            Ok(())
        })
    }

    /// Loads torchvision-named ResNet50 weights (e.g. ImageNet, exported by
    /// `deploy/export_resnet50_weights.py`) into the shared trunk. `fc.*` and
    /// `num_batches_tracked` are ignored; any other missing, unexpected or mis-shaped tensor
    /// is an error naming it. Returns the number of tensors loaded.
    pub fn load_torchvision_trunk(&mut self, path: &Path) -> Result<usize> {
        let (state, _) = ModelState::load(path)?;
        let vars = self.vs.variables();
        let prefix = format!("{TRUNK_PREFIX}.");
        let trunk_names: BTreeSet<String> = vars.keys().filter_map(|k| k.strip_prefix(&prefix).map(str::to_string)).collect();
        let file_names: BTreeSet<String> = state
            .specs()
            .iter()
            .map(|s| s.name.clone())
            .filter(|n| !n.starts_with("fc.") && !n.ends_with("num_batches_tracked"))
            .collect();
        let missing: Vec<_> = trunk_names.difference(&file_names).collect();
        let unexpected: Vec<_> = file_names.difference(&trunk_names).collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            bail!(
                "{}: not a torchvision ResNet50 state_dict: {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
                path.display(),
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                unexpected.len(),
                unexpected.iter().take(3).collect::<Vec<_>>()
            );
        }
        let device = self.vs.device();
        tch::no_grad(|| -> Result<()> {
            for name in &trunk_names {
                let values = state.tensor(name).expect("checked above");
                let mut var = vars[&format!("{prefix}{name}")].shallow_clone();
                if var.numel() != values.len() {
                    bail!("{}: tensor {name} has {} values, the trunk expects {:?}", path.display(), values.len(), var.size());
                }
                var.copy_(&Tensor::from_slice(values).view(var.size().as_slice()).to_device(device));
            }
            Ok(())
        })?;
        Ok(trunk_names.len())
    }
}
