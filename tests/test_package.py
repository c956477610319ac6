"""Package-level properties: the functional core stays Flax-free (DESIGN.md, "Layering")."""
import subprocess
import sys


def test_core_imports_without_flax():
    code = ("import sys, jaxdiff, jaxdiff.guidance, jaxdiff.losses, jaxdiff.samplers, jaxdiff.sampling, "
            "jaxdiff.schedules, jaxdiff.denoisers, jaxdiff.mixtures; "
            "print(sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the core imported Flax modules: {out.stdout.strip()}"


def test_the_package_with_its_weights_stays_under_50_mb():
    """Everything pyproject ships (the code, the built-in weights, the CLIP vocabulary) is under 50 MB."""
    from pathlib import Path

    import jaxdiff

    root = Path(jaxdiff.__file__).parent
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 50e6, f"jaxdiff/ holds {size / 1e6:.1f} MB"
