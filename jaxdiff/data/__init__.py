"""Data sets built here from data shipped inside packages.

:mod:`jaxdiff.data.digits_text`: scikit-learn's digits as 32x32 RGB images with an ink and a background
colour, and captions from the label and measured attributes (thickness, slant), for the small
text-to-image model; with the functions that measure those attributes back from pixels.
:mod:`jaxdiff.data.moving_digits`: the same digits moving and bouncing inside a frame, as short videos,
with the centre-of-mass motion measure.
"""
from jaxdiff.data.digits_text import COLOUR_PAIRS as COLOUR_PAIRS
from jaxdiff.data.digits_text import COLOURS as COLOURS
from jaxdiff.data.digits_text import HELDOUT_COMBINATIONS as HELDOUT_COMBINATIONS
from jaxdiff.data.digits_text import PALETTE as PALETTE
from jaxdiff.data.digits_text import SLANTS as SLANTS
from jaxdiff.data.digits_text import THICKNESSES as THICKNESSES
from jaxdiff.data.digits_text import alpha_maps as alpha_maps
from jaxdiff.data.digits_text import attribute_thresholds as attribute_thresholds
from jaxdiff.data.digits_text import caption as caption
from jaxdiff.data.digits_text import composite as composite
from jaxdiff.data.digits_text import ink_mass as ink_mass
from jaxdiff.data.digits_text import load_digits_text as load_digits_text
from jaxdiff.data.digits_text import measure_alpha as measure_alpha
from jaxdiff.data.digits_text import measure_attributes as measure_attributes
from jaxdiff.data.digits_text import measure_background as measure_background
from jaxdiff.data.digits_text import measure_ink as measure_ink
from jaxdiff.data.digits_text import parse_caption as parse_caption
from jaxdiff.data.digits_text import shear as shear
from jaxdiff.data.moving_digits import centre_of_mass as centre_of_mass
from jaxdiff.data.moving_digits import load_moving_digits as load_moving_digits
from jaxdiff.data.moving_digits import motion_step as motion_step
