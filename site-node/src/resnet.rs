//! The shared ResNet50 trunk, built from tch's `nn` layers with exactly the variable names
//! of `tch::vision::resnet::resnet50_no_final_layer` (and so of torchvision's `state_dict`),
//! but split in two: [`Trunk::feature_map`] returns the last residual block's output, which
//! Grad-CAM needs, and [`Trunk::pool`] turns it into the 2048-wide vector the head uses.

use tch::nn::{self, ModuleT};
use tch::Tensor;

fn conv2d(p: nn::Path, c_in: i64, c_out: i64, ksize: i64, padding: i64, stride: i64) -> nn::Conv2D {
    nn::conv2d(p, c_in, c_out, ksize, nn::ConvConfig { stride, padding, bias: false, ..Default::default() })
}

fn downsample(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> nn::SequentialT {
    if stride != 1 || c_in != c_out {
        nn::seq_t().add(conv2d(&p / "0", c_in, c_out, 1, 0, stride)).add(nn::batch_norm2d(&p / "1", c_out, Default::default()))
    } else {
        nn::seq_t()
    }
}

fn bottleneck_block(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    let e_dim = 4 * c_out;
    let conv1 = conv2d(&p / "conv1", c_in, c_out, 1, 0, 1);
    let bn1 = nn::batch_norm2d(&p / "bn1", c_out, Default::default());
    let conv2 = conv2d(&p / "conv2", c_out, c_out, 3, 1, stride);
    let bn2 = nn::batch_norm2d(&p / "bn2", c_out, Default::default());
    let conv3 = conv2d(&p / "conv3", c_out, e_dim, 1, 0, 1);
    let bn3 = nn::batch_norm2d(&p / "bn3", e_dim, Default::default());
    let downsample = downsample(&p / "downsample", c_in, e_dim, stride);
    nn::func_t(move |xs, train| {
        let ys = xs
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .apply(&conv2)
            .apply_t(&bn2, train)
            .relu()
            .apply(&conv3)
            .apply_t(&bn3, train);
        (xs.apply_t(&downsample, train) + ys).relu()
    })
}

fn bottleneck_layer(p: nn::Path, c_in: i64, c_out: i64, stride: i64, blocks: i64) -> nn::SequentialT {
    let mut layer = nn::seq_t().add(bottleneck_block(&p / "0", c_in, c_out, stride));
    for i in 1..blocks {
        layer = layer.add(bottleneck_block(&p / &i.to_string(), 4 * c_out, c_out, 1));
    }
    layer
}

/// ResNet50 without its classifier.
#[derive(Debug)]
pub struct Trunk {
    body: nn::FuncT<'static>,
}

impl Trunk {
    pub fn resnet50(p: &nn::Path) -> Self {
        let conv1 = conv2d(p / "conv1", 3, 64, 7, 3, 2);
        let bn1 = nn::batch_norm2d(p / "bn1", 64, Default::default());
        let layer1 = bottleneck_layer(p / "layer1", 64, 64, 1, 3);
        let layer2 = bottleneck_layer(p / "layer2", 256, 128, 2, 4);
        let layer3 = bottleneck_layer(p / "layer3", 512, 256, 2, 6);
        let layer4 = bottleneck_layer(p / "layer4", 1024, 512, 2, 3);
        let body = nn::func_t(move |xs, train| {
            xs.apply(&conv1)
                .apply_t(&bn1, train)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
                .apply_t(&layer1, train)
                .apply_t(&layer2, train)
                .apply_t(&layer3, train)
                .apply_t(&layer4, train)
        });
        Self { body }
    }

    /// Output of the last residual block, `[B, 2048, h, w]`.
    pub fn feature_map(&self, xs: &Tensor, train: bool) -> Tensor {
        self.body.forward_t(xs, train)
    }

    /// Global average pooling to `[B, 2048]`.
    pub fn pool(map: &Tensor) -> Tensor {
        map.adaptive_avg_pool2d([1, 1]).flat_view()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn same_names_and_outputs_as_tch_resnet50() {
        let ours = nn::VarStore::new(Device::Cpu);
        let theirs = nn::VarStore::new(Device::Cpu);
        let trunk = Trunk::resnet50(&(ours.root() / "trunk"));
        let reference = tch::vision::resnet::resnet50_no_final_layer(&(theirs.root() / "trunk"));
        let mut a: Vec<String> = ours.variables().into_keys().collect();
        let mut b: Vec<String> = theirs.variables().into_keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        // Same weights → same pooled output.
        let src = theirs.variables();
        tch::no_grad(|| {
            for (name, mut v) in ours.variables() {
                v.copy_(&src[&name]);
            }
        });
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let got = Trunk::pool(&trunk.feature_map(&x, false));
        let want = reference.forward_t(&x, false);
        assert_eq!(got.size(), vec![2, 2048]);
        assert!(f64::try_from((got - want).abs().max()).unwrap() < 1e-4);
    }
}
