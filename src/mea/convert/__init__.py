from .fold import export_plain, fold_hlc

__all__ = ["export_plain", "fold_hlc"]
