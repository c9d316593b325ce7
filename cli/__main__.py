"""`python -m f2m_ray_cli` is the same as `f2m-ray`."""

from f2m_ray_cli.main import main

main()
