#!/usr/bin/env python3
"""The bimodal step of site-node written in PyTorch eager, for `make bench`'s comparison.

Same model as site-node/src/resnet.rs + model.rs (one ResNet50 trunk for both crops,
pooled outputs concatenated, FC 4096→256→(64+19 clinical inputs)→2 with dropout 0.5),
same Adam step, random inputs, median of N steps after one warm-up. Prints JSON.
Only torch is needed (the project's venv); no torchvision.
"""
import argparse, json, time
import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    def __init__(self, c_in, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False); self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False); self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False); self.bn3 = nn.BatchNorm2d(4 * c)
        self.down = None
        if stride != 1 or c_in != 4 * c:
            self.down = nn.Sequential(nn.Conv2d(c_in, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for c, n, s in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(c_in, c, s if i == 0 else 1)); c_in = 4 * c
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)


class Bimodal(nn.Module):
    def __init__(self, hidden=256, feature=64, clinical=19, classes=2):
        super().__init__()
        self.trunk = Trunk()
        self.fc1 = nn.Linear(4096, hidden); self.fc2 = nn.Linear(hidden + clinical, feature); self.fc3 = nn.Linear(feature, classes)

    def forward(self, us, swe, clin):
        h = F.dropout(F.relu(self.fc1(torch.cat([self.trunk(us), self.trunk(swe)], 1))), 0.5, self.training)
        return self.fc3(F.relu(self.fc2(torch.cat([h, clin], 1))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=64); ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5); ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = Bimodal().to(dev); opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    us = torch.randn(a.batch, 3, a.image_size, a.image_size, device=dev); swe = torch.randn_like(us)
    clin = torch.zeros(a.batch, 19, device=dev); y = (torch.arange(a.batch, device=dev) % 2)
    sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)
    train = []
    net.train()
    for i in range(a.steps + 1):
        t = time.perf_counter(); opt.zero_grad(); F.cross_entropy(net(us, swe, clin), y).backward(); opt.step(); sync()
        if i: train.append(time.perf_counter() - t)
    infer = []
    net.eval()
    with torch.no_grad():
        for i in range(a.steps + 1):
            t = time.perf_counter(); net(us, swe, clin); sync()
            if i: infer.append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]
    print(json.dumps({"framework": "pytorch-eager", "image_size": a.image_size, "batch": a.batch, "threads": torch.get_num_threads(),
                      "device": dev, "train_step_s": med(train), "inference_s": med(infer)}))


if __name__ == "__main__":
    main()
