"""Quick exact-mode ablations on small CNNs and MLPs (no baselines): which model and learning rate exact mode explains.

    python scripts/exact_ablation.py NAME NORM ACT POOL LR EPOCHS DROP_LO DROP_HI RETRAINS TEST_POINTS [WIDTH] [OPT] [SCHED]

NAME starting with "f": 5,000 Fashion-MNIST images, else digits. NORM: bn | none | gn (GroupNorm, 4 groups) |
ln (GroupNorm, 1 group); ACT: relu | gelu | silu | softplus; POOL: max | avg, or mlp (784/256 → 128 → 128 → 10
with ACT, NORM ignored). The CNN is the digits CNN's shape (conv-NORM-ACT-POOL twice, WIDTH and 2·WIDTH channels,
then a 64-unit hidden layer). The recipe is eval_exact.py's (SGD, momentum 0.9, weight decay 5e-4, linear decay,
batch 64, seed 0) with LR and EPOCHS; test points and drop sets are drawn with the study's seeds, so the LDS is
the study's same-seed small-drop LDS over fewer retrains and test points. Appends one JSON line to
$INFLUENCE_EXACT_CACHE/ablation.jsonl (default runs/exact_cache).
"""
import dataclasses, json, os, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from influence.evaluation.exact_study import load_data, TEST_SEED, DROP_SEED, RECIPE
from influence.evaluation.exact_lds import drop_lds, drop_masks, final_margins
from influence.exact import metagradient
from torch import nn

def make(norm, act, pool, width, data):
    A = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": lambda: nn.Softplus(beta=4)}[act]
    P = {"mlp": None, "max": lambda: nn.MaxPool2d(2), "avg": lambda: nn.AvgPool2d(2)}.get(pool)
    def N(c):
        return {"bn": lambda: nn.BatchNorm2d(c), "none": lambda: nn.Identity(), "gn": lambda: nn.GroupNorm(4, c),
                "ln": lambda: nn.GroupNorm(1, c)}[norm]()
    side = 16 if data == "digits" else 28
    if pool == "mlp":
        return lambda: nn.Sequential(nn.Flatten(), nn.Linear(side * side, 128), A(), nn.Linear(128, 128), A(), nn.Linear(128, 10))
    def f():
        w = width
        return nn.Sequential(nn.Conv2d(1, w, 3, padding=1), N(w), A(), P(), nn.Conv2d(w, 2 * w, 3, padding=1), N(2 * w), A(), P(),
                             nn.Flatten(), nn.Linear(2 * w * (side // 4) ** 2, 64), A(), nn.Linear(64, 10))
    return f

a = sys.argv[1:]
name, norm, act, pool = a[:4]
lr, epochs, lo, hi, R, Ntest = float(a[4]), int(a[5]), float(a[6]), float(a[7]), int(a[8]), int(a[9])
width = int(a[10]) if len(a) > 10 else 16
opt = a[11] if len(a) > 11 else "sgd"
sched = a[12] if len(a) > 12 else "linear"
data = "fashion" if name.startswith("f") else "digits"
train, test = load_data("fashion-mlp" if data == "fashion" else "digits-mlp")
recipe = dataclasses.replace(RECIPE, model=make(norm, act, pool, width, data), lr=lr, epochs=epochs, optimizer=opt, schedule=sched)
ids = np.sort(np.random.default_rng(TEST_SEED).choice(len(test), Ntest, replace=False))
x, y = test.x[ids], test.y[ids]
t0 = time.time(); net = recipe.train(train); ttrain = time.time() - t0
with torch.no_grad():
    acc = float((net.eval()(test.x).argmax(-1) == test.y).float().mean())
base = final_margins(net, x, y)
t0 = time.time()
sc = np.concatenate([metagradient(recipe, train, x[b:b+10], y[b:b+10]).scores for b in range(0, Ntest, 10)], 1); tq = time.time() - t0
masks = drop_masks(len(train), R, lo, hi, seed=DROP_SEED)
t0 = time.time()
after = np.stack([final_margins(recipe.train(train, weights=(~m).astype(np.float64)), x, y) for m in masks]); tr = time.time() - t0
r = drop_lds(sc, masks, after - base)
out = dict(name=name, argv=a, acc=acc, lds=r["lds"], ci=r["ci"], pearson=r["pearson"], mean_abs=float(np.abs(after - base).mean()),
           train_s=ttrain, query_s=tq, retrain_s=tr)
print(json.dumps(out), flush=True)
from pathlib import Path as _P
_out = _P(os.environ.get("INFLUENCE_EXACT_CACHE", "runs/exact_cache")) / "ablation.jsonl"
_out.parent.mkdir(parents=True, exist_ok=True)
with open(_out, "a") as fh:
    fh.write(json.dumps(out) + "\n")
