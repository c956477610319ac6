"""Paths and the fixture generator shared by the CLIP, T5 and DiT parity tests."""
import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "models"
CONFIGS = HERE.parents[1] / "jaxdiff" / "models" / "configs"
_spec = importlib.util.spec_from_file_location("make_textdit", HERE / "fixtures" / "make_textdit.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)
