"""What the distribution installs: one top-level import name, owned by it alone, and every package
of the tree listed in `pyproject.toml` (the `kernels/` folder mapped to `jaxrl_entropy.kernels`)."""
import importlib.metadata
import os
import tomllib

import jaxrl_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = "jaxrl-entropy"


def test_every_top_level_import_name_we_install_belongs_to_this_distribution_alone():
    # A second distribution under one of our names (HF's `kernels` once took ours) means that which
    # of the two Python imports depends on sys.path's order: a user's console script breaks.
    owners = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in owners.items() if DIST in dists)
    assert ours == ["jaxrl_entropy"], f"{DIST} installs the top-level names {ours}; keep one"
    shared = {name: owners[name] for name in ours if set(owners[name]) != {DIST}}  # an egg-info in the checkout lists us twice
    assert not shared, f"import names claimed by other distributions too: {shared}"


def test_the_kernels_folder_is_imported_as_a_subpackage_from_any_directory(tmp_path):
    import subprocess
    import sys

    probe = "import jaxrl_entropy.kernels as k; print(k.__file__)"
    for cwd in (ROOT, str(tmp_path)):
        out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert out.returncode == 0, out.stderr
        installed = os.path.dirname(out.stdout.strip())
        # editable: the checkout's kernels/; a wheel: site-packages/jaxrl_entropy/kernels
        assert installed == os.path.join(ROOT, "kernels") or installed.endswith(
            os.path.join("jaxrl_entropy", "kernels")), installed


def test_pyproject_lists_every_package_of_the_tree():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    in_tree = {"jaxrl_entropy.kernels"} | {
        os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.dirname(jaxrl_entropy.__file__)) if "__init__.py" in files}
    assert setuptools["package-dir"]["jaxrl_entropy.kernels"] == "kernels"
    assert listed == in_tree, (f"add to [tool.setuptools] packages: {sorted(in_tree - listed)}; "
                               f"remove: {sorted(listed - in_tree)}")
