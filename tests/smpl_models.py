"""A small random body model in SMPL's file format, for tests that need one (SMPL itself is licensed separately).

It has SMPL's 24 joints, kinematic tree, 10 shape and 207 pose components, but a few dozen vertices: SMPL's
.pkl layout (a latin1 pickle of a dict, J_regressor a scipy sparse matrix, kintree_table uint32 with the root's
parent 2**32 - 1) or the same arrays in an .npz. Vertex 0 is at the origin and joint 0 (the pelvis) is vertex 0.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)


def smpl_arrays(n_vertices: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's arrays by SMPL's names, random but valid (J_regressor rows are convex weights)."""
    rng = np.random.default_rng(seed)
    v_template = rng.uniform(-0.4, 0.4, (n_vertices, 3))
    v_template[0] = 0.0
    regressor = np.zeros((24, n_vertices))
    regressor[0, 0] = 1.0
    for j in range(1, 24):
        picked = rng.choice(np.arange(1, n_vertices), size=3, replace=False)
        regressor[j, picked] = rng.dirichlet(np.ones(3))
    weights = rng.uniform(0.0, 1.0, (n_vertices, 24))
    parents = np.array([2**32 - 1, *SMPL_PARENTS[1:]], dtype=np.uint32)
    return {
        "v_template": v_template,
        "shapedirs": rng.normal(0.0, 0.03, (n_vertices, 3, 10)),
        "posedirs": rng.normal(0.0, 0.01, (n_vertices, 3, 207)),
        "J_regressor": regressor,
        "weights": weights / weights.sum(axis=1, keepdims=True),
        "kintree_table": np.stack([parents, np.arange(24, dtype=np.uint32)]),
        "f": rng.integers(0, n_vertices, (2 * n_vertices, 3)).astype(np.uint32),
    }


def write_smpl_model(path: Path, n_vertices: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the model to `path` (.pkl as SMPL ships it, else .npz); returns its arrays (J_regressor dense)."""
    import scipy.sparse

    arrays = smpl_arrays(n_vertices, seed)
    if path.suffix == ".pkl":
        data = {**arrays, "J_regressor": scipy.sparse.csc_matrix(arrays["J_regressor"]), "bs_style": "lbs",
                "bs_type": "lrotmin"}
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)
    else:
        np.savez(path, **arrays)
    return arrays
