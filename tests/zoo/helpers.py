"""Small builders shared by the zoo tests."""

import json
import os
import signal
from pathlib import Path

import torch

from lightning_interp import create_dictionary
from lightning_interp.dictionaries.config import Provenance


def make_sae(site="layers.1.resid_post", *, seed=0, d_in=8, d_latent=32, k=4, backbone="gpt2"):
    """A TopK SAE with random (seeded) weights and a filled-in provenance."""
    torch.manual_seed(seed)
    provenance = Provenance(backbone=backbone, site=site, dataset="Skylion007/openwebtext")
    sae = create_dictionary("topk", d_in=d_in, d_latent=d_latent, k=k, provenance=provenance)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae.eval()


def write_run(root, saes_by_name, metrics_by_name=None):
    """A multi-dictionary training run as ExportDictionary writes it."""
    for name, sae in saes_by_name.items():
        sae.save_pretrained(root / name / "dictionary")
        metrics = (metrics_by_name or {}).get(name)
        if metrics is not None:
            (root / name / "metrics.json").write_text(json.dumps(metrics))
    return root


def assert_same_weights(a, b):
    ta, tb = a.export_tensors(), b.export_tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=0)


#: Where a pair writer (weights, then config) is killed, and which object must survive:
#: ``(when, which file's rename, survivor)`` for :func:`write_then_kill`.
KILL_POINTS = [
    ("before", 1, "old"),  # killed with the new weights complete, not yet renamed
    ("after", 1, "new"),  # killed between the weights' rename and the config's
    ("after", 0, "new"),  # killed after both renames
]


def write_then_kill(write, *, when, target):
    """Run ``write()`` in a forked child that SIGKILLs itself at the rename onto ``target``.

    ``when`` is ``"before"`` (the temporary is complete, the rename never happens) or
    ``"after"`` (the rename happened, nothing after it does). The kill is real: the child
    dies by SIGKILL at that point, as a process killed by the OOM killer or ``kill -9``
    would, leaving the folder as the kernel has it. Returns the child's wait status.
    """
    pid = os.fork()
    if pid == 0:  # the child: it never returns into pytest
        try:
            real_replace = os.replace

            def replace(src, dst):
                if when == "before" and Path(dst).name == target:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst)
                if when == "after" and Path(dst).name == target:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace
            write()
        finally:
            os._exit(1)  # reached only if the kill point never came
    _, status = os.waitpid(pid, 0)
    return status
