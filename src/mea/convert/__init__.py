from .families import FAMILIES
from .export import EXPORT_TARGETS, export_mqa
from .fold import export_plain, fold_hlc
from .hf_to_mea import mea_config_from, to_mea
from .sources import Source, load_source

__all__ = ["EXPORT_TARGETS", "FAMILIES", "Source", "export_mqa", "export_plain", "fold_hlc", "load_source",
           "mea_config_from", "to_mea"]
