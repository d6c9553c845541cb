"""unet: the seed's two U-Nets on minitensor, and the Shape-dataset workflow around them."""
from .models import small_unet, unet

__all__ = ["small_unet", "unet"]
