"""The host side: files and block devices under an image (sizes, growth,
zeroing, bounded writes, page-cache prefault) and raw images."""
