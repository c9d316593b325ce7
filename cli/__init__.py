"""The `f2m-ray` command line (installed as the package ``f2m_ray_cli``)."""
