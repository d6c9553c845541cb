"""unet: the post's two U-Nets on minitensor, and the Shape-dataset workflow around them."""
import minitensor  # noqa: F401  (first: its thread defaults must precede NumPy, see minitensor/cpu_runtime.py)

from .models import small_unet, unet

__all__ = ["small_unet", "unet"]
