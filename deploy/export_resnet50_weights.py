#!/usr/bin/env python3
"""Export torchvision ResNet50 ImageNet weights to safetensors for `site-node init-model --pretrained`.

No weights are downloaded here. Give it the torchvision checkpoint you already have
(e.g. resnet50-0676ba61.pth / resnet50-11ad3fa6.pth from torchvision's model zoo):

    python3 deploy/export_resnet50_weights.py --pth resnet50-11ad3fa6.pth --out resnet50_imagenet.safetensors
    site-node init-model --pretrained resnet50_imagenet.safetensors --out initial_model.safetensors

Only torch is needed (the project's venv has it). Tensor names stay torchvision's
`state_dict` keys; the site-node maps them onto its shared trunk and checks every name
and shape. `fc.*` and `num_batches_tracked` are written but ignored on load.
"""
import argparse
import json
import struct

import torch


def write_safetensors(tensors: dict, path: str) -> None:
    """Minimal safetensors writer (F32 only), so no extra package is required."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"source": "torchvision resnet50"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pth", required=True, help="torchvision ResNet50 state_dict (.pth)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    a = ap.parse_args()
    state = torch.load(a.pth, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if v.dtype.is_floating_point}
    if "layer4.2.bn3.running_var" not in state:
        raise SystemExit(f"{a.pth}: does not look like a torchvision ResNet50 state_dict")
    write_safetensors(state, a.out)
    print(f"wrote {len(state)} tensors to {a.out}")


if __name__ == "__main__":
    main()
