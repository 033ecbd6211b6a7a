"""An external teacher package, installed with pip, is seen by `omniforge list` and labels a corpus."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from images import photo_bytes
from omniforge import codecs
from omniforge import shards

PLUGIN = Path(__file__).parents[1] / "fixtures" / "omniforge-example-plugin"


@pytest.mark.slow
def test_pip_installed_plugin_is_listed_and_labels(tmp_path):
    site, source = tmp_path / "site", tmp_path / "plugin"
    shutil.copytree(PLUGIN, source)  # the build writes next to its sources: keep the repo clean
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    cli = [sys.executable, "-m", "omniforge.jobs.cli"]

    listed = subprocess.run(cli + ["list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["mean_color", "classical"] for line in listed.stdout.splitlines())

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("chelsea", "coffee", "rocket")):
        (corpus / f"img{i}.jpg").write_bytes(photo_bytes(name, 40))
    out = tmp_path / "out"
    run = subprocess.run(cli + ["label", "--input", str(corpus), "--output", str(out), "--modalities",
                                "rgb,mean_color", "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rgbs = {shards.member_key(n): codecs.decode("jpg", d) for n, d in shards.iter_tar(str(out / "rgb" / "shard-000000.tar"))}
    means = {shards.member_key(n): codecs.decode("npy", d)
             for n, d in shards.iter_tar(str(out / "mean_color" / "shard-000000.tar"))}
    assert set(means) == set(rgbs) == {"img0", "img1", "img2"}
    for key, mean in means.items():  # the plugin saw the same decoded image rgb stored (JPEG round trip aside)
        np.testing.assert_allclose(mean.astype(np.float32), rgbs[key].reshape(-1, 3).mean(0), atol=3)
    verified = subprocess.run(cli + ["verify", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
