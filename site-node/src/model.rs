//! The bimodal network: ONE ResNet50 trunk (shared weights) applied to the US crop and to
//! the SWE crop, pooled outputs concatenated (2 × 2048), then three Xavier-initialised FC
//! layers. The penultimate FC output (after ReLU) is the "deep feature" vector.
//!
//! The penultimate layer also has [`CLINICAL_FEATURES`] inputs for the clinical variables:
//! they carry zeros (and so never change) except in the ResNet50+C control, which feeds
//! clinical variables into the network instead of fusing them in the SVM afterwards. One
//! architecture thus serves every experiment of the study, from one initial model.
//!
//! Tensor names are `trunk.<torchvision key>` and `head.fc{1,2,3}.{weight,bias}`; the
//! whole `VarStore` — weights *and* BatchNorm running statistics — is exchanged and
//! averaged, so every site evaluates with the same global normalisation statistics
//! (FedBN-style local statistics would make the global model incomplete).

use std::collections::BTreeSet;
use std::path::Path;

use aln_common::cohort::CLINICAL_FEATURES;
use aln_common::constants::{HEAD_LAYERS, HEAD_PREFIX, TRUNK_FEATURES, TRUNK_PREFIX};
use aln_common::model_state::ModelState;

use crate::resnet::Trunk;
use anyhow::{Context, Result, anyhow, bail};
use tch::nn::{self, Module};
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
    trunk: Trunk,
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
        let trunk = Trunk::resnet50(&(&root / TRUNK_PREFIX));
        let head = &root / HEAD_PREFIX;
        let fc1 = xavier_linear(&head / HEAD_LAYERS[0], 2 * TRUNK_FEATURES as i64, dims.hidden);
        let fc2 = xavier_linear(&head / HEAD_LAYERS[1], dims.hidden + CLINICAL_FEATURES as i64, dims.feature);
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

    /// `(logits, deep_features)` for a batch of US and SWE crops and `[B, CLINICAL_FEATURES]`
    /// clinical inputs (zeros unless the experiment feeds clinical variables to the head).
    pub fn forward_t(&self, us: &Tensor, swe: &Tensor, clinical: &Tensor, train: bool) -> (Tensor, Tensor) {
        let a = self.trunk.feature_map(us, train);
        let b = self.trunk.feature_map(swe, train);
        self.head(&a, &b, clinical, train)
    }

    /// The head on the two last-block feature maps: pool, concatenate, three FC layers.
    fn head(&self, us_map: &Tensor, swe_map: &Tensor, clinical: &Tensor, train: bool) -> (Tensor, Tensor) {
        let x = Tensor::cat(&[Trunk::pool(us_map), Trunk::pool(swe_map)], 1);
        let h = self.fc1.forward(&x).relu().dropout(0.5, train);
        let deep = self.fc2.forward(&Tensor::cat(&[h, clinical.shallow_clone()], 1)).relu();
        let logits = self.fc3.forward(&deep);
        (logits, deep)
    }

    /// Grad-CAM (Selvaraju et al. 2017) on the last conv layer of the last residual block,
    /// for one patient (batch of 1) and the class the network predicts. Returns the class
    /// and one `[h, w]` map in [0, 1] per modality (US, SWE).
    pub fn grad_cam(&self, us: &Tensor, swe: &Tensor, clinical: &Tensor) -> Result<(i64, Tensor, Tensor)> {
        let a = self.trunk.feature_map(us, false);
        let b = self.trunk.feature_map(swe, false);
        let (logits, _) = self.head(&a, &b, clinical, false);
        let class = logits.argmax(-1, false).int64_value(&[0]);
        let score = logits.select(1, class).sum(Kind::Float);
        let grads = Tensor::run_backward(&[score], &[&a, &b], false, false);
        let cam = |map: &Tensor, grad: &Tensor| -> Tensor {
            let weights = grad.mean_dim([2i64, 3].as_slice(), true, Kind::Float);
            let c = (map * weights).sum_dim_intlist([1i64].as_slice(), false, Kind::Float).relu().get(0).detach();
            let max = c.max().double_value(&[]);
            if max > 0.0 { c / max } else { c }
        };
        Ok((class, cam(&a, &grads[0]), cam(&b, &grads[1])))
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
                let spec = state.specs().iter().find(|s| &s.name == name).expect("checked above");
                let mut var = vars[&format!("{prefix}{name}")].shallow_clone();
                let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
                if var.size() != shape {
                    bail!("{}: tensor {name} has shape {shape:?}, the trunk expects {:?}", path.display(), var.size());
                }
                var.copy_(&Tensor::from_slice(values).view(var.size().as_slice()).to_device(device));
            }
            Ok(())
        })?;
        Ok(trunk_names.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dims() -> HeadDims {
        HeadDims { hidden: 8, feature: 4, classes: 2 }
    }

    #[test]
    fn export_import_round_trip_is_exact() {
        tch::manual_seed(1);
        let a = BimodalNet::new(Device::Cpu, dims());
        let state = a.export().unwrap();
        assert!(state.tensor("trunk.layer4.2.bn3.running_var").is_some(), "BN statistics are part of the state");
        assert!(state.tensor("head.fc2.weight").is_some());
        tch::manual_seed(2);
        let b = BimodalNet::from_state(Device::Cpu, &state).unwrap();
        assert_eq!(b.dims, dims());
        assert_eq!(b.export().unwrap().weights_hash(), state.weights_hash());
    }

    #[test]
    fn torchvision_named_weights_load_exactly_into_the_trunk() {
        let dir = tempfile::tempdir().unwrap();
        tch::manual_seed(3);
        let donor = BimodalNet::new(Device::Cpu, dims()).export().unwrap();
        // A torchvision-style file: no prefix, plus fc.* and num_batches_tracked to ignore.
        let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = donor
            .tensors()
            .filter_map(|(s, v)| s.name.strip_prefix("trunk.").map(|n| (n.to_string(), s.shape.clone(), v.iter().map(|x| x * 0.5 + 0.25).collect())))
            .collect();
        named.push(("fc.weight".into(), vec![1000, 2048], vec![0.0; 2048 * 1000]));
        named.push(("bn1.num_batches_tracked".into(), vec![1], vec![7.0]));
        let file = ModelState::from_named(named.clone()).unwrap();
        let path = dir.path().join("resnet50.safetensors");
        file.save(&path, &HashMap::new()).unwrap();

        let mut net = BimodalNet::new(Device::Cpu, dims());
        let head_before = net.export().unwrap().tensor("head.fc1.weight").unwrap().to_vec();
        assert_eq!(net.load_torchvision_trunk(&path).unwrap(), named.len() - 2);
        let after = net.export().unwrap();
        for (name, _, values) in &named[..named.len() - 2] {
            assert_eq!(after.tensor(&format!("trunk.{name}")).unwrap(), values.as_slice(), "{name}");
        }
        assert_eq!(after.tensor("head.fc1.weight").unwrap(), head_before.as_slice());

        // A file missing a tensor is refused, naming it.
        let partial = ModelState::from_named(named.into_iter().filter(|(n, _, _)| n != "layer2.0.conv1.weight").collect()).unwrap();
        partial.save(&path, &HashMap::new()).unwrap();
        let e = net.load_torchvision_trunk(&path).unwrap_err().to_string();
        assert!(e.contains("layer2.0.conv1.weight"), "{e}");
    }
}
