"""What the distribution installs: one top-level import name, owned by it alone; and nothing at the
checkout's root that shadows an installed distribution when the root is on `sys.path` (as it is for
`python -m pytest` run there)."""
import importlib.metadata
import os
import subprocess
import sys
from conftest import REPO_ROOT

ROOT = str(REPO_ROOT)
DIST = "jaxrl-entropy"


def test_every_top_level_import_name_we_install_belongs_to_this_distribution_alone():
    # A second distribution under one of our names (HF's `kernels` once took ours) means that which
    # of the two Python imports depends on sys.path's order: a user's console script breaks.
    owners = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in owners.items() if DIST in dists)
    assert ours == ["jaxrl_entropy"], f"{DIST} installs the top-level names {ours}; keep one"
    # an egg-info in the checkout lists us twice: compare as sets
    shared = {name: owners[name] for name in ours if set(owners[name]) != {DIST}}
    assert not shared, f"import names claimed by other distributions too: {shared}"


def test_nothing_at_the_checkout_root_shadows_an_installed_distribution():
    # `python -m pytest` (and `python -m jaxrl_entropy.cli.main` started there) puts the root first on
    # sys.path: a regular package or module there wins over site-packages for every importer,
    # transformers included.
    owners = importlib.metadata.packages_distributions()
    importable = {entry[:-3] if entry.endswith(".py") else entry for entry in os.listdir(ROOT)
                  if entry.endswith(".py") or os.path.isfile(os.path.join(ROOT, entry, "__init__.py"))}
    clashes = {name: owners[name] for name in importable - {"jaxrl_entropy"} if name in owners}
    assert not clashes, f"importable names at the checkout's root that installed distributions also use: {clashes}"


def test_transformers_imports_hf_kernels_from_the_checkout_root():
    # HF's `kernels` is a transformers dependency now; from the root it must still be HF's
    probe = "import kernels, sys; sys.stdout.write(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0 and "No module named 'kernels'" in out.stderr:
        return  # an older transformers without it: nothing to shadow
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout, out.stdout


def test_extras_for_gcs_and_cuda_follow_jax_bounds():
    """`pip install '.[cuda]'` brings jax's CUDA 12 wheels within the bounds the project sets for
    jax itself (as `.[tpu]` does for libtpu); `.[gcs]` brings gcsfs for gs:// paths."""
    import re
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    jax_bounds = next(re.sub(r"^jax", "", d) for d in project["dependencies"] if re.match(r"jax[<>=]", d))
    extras = project["optional-dependencies"]
    assert extras["cuda"] == [f"jax[cuda12]{jax_bounds}"] and extras["tpu"] == [f"jax[tpu]{jax_bounds}"]
    assert [d.split(">=")[0] for d in extras["gcs"]] == ["gcsfs"]
