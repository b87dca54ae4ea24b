"""`ddaug gap`: does the augmentation close the domain gap, and at which dose?"""

from .dose import Dose, check_folders, parse_dose
from .run import GapOptions, format_report, run_gap

__all__ = ["Dose", "check_folders", "parse_dose", "GapOptions", "format_report", "run_gap"]
