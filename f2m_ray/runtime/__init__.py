"""The only Ray plumbing: start or join Ray, what workers inherit, the console, actor plans,
Ray Train settings and errors coming back from Ray.

    cluster   ensure_ray: join RAY_ADDRESS or start embedded local Ray (address="local")
    env       the storage variables every Ray worker gets from the driver
    console   the command line's console: native noise filtered, Ray Data and Train quiet
    actors    how many model actors, with how many threads, CPUs and GPU shares
    trainer   Ray Train: resources per worker, storage arguments
    errors    one line from what failed inside an actor or a training worker
    datasets  Ray Datasets over files the driver names (f2m_ray.synthetic.open_synthetic)

May import: f2m_ray.errors, f2m_ray.storage (and Ray). Imported by data, synthetic, evaluation, synth, train.
"""
