"""Package-level properties: the functional core stays Flax-free (DESIGN.md, "Layering")."""
import subprocess
import sys


def test_core_imports_without_flax():
    code = ("import sys, jaxdiff, jaxdiff.guidance, jaxdiff.losses, jaxdiff.samplers, jaxdiff.sampling, "
            "jaxdiff.schedules, jaxdiff.denoisers, jaxdiff.mixtures; "
            "print(sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the core imported Flax modules: {out.stdout.strip()}"
