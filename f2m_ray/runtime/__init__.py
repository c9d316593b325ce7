"""Ray plumbing shared by every workflow: start or join Ray, what workers inherit, the console,
stops, actor plans, Ray Train settings and errors coming back from Ray. The rooms that build
Ray work themselves (data decode tasks, the encode and synthesis actor pools, Ray Train runs, the
judge's and usefulness' training) import Ray where they use it, inside the functions that run on
a cluster, so that importing f2m_ray never imports Ray.

    cluster   ensure_ray: join RAY_ADDRESS or start embedded local Ray (address="local")
    env       the storage variables every Ray worker gets from the driver
    console   the command line's console: native noise filtered, Ray Data and Train quiet
    stop      SIGTERM and Ctrl-C: one line saying what was kept and how to resume
    actors    how many model actors, with how many threads, CPUs and GPU shares
    trainer   Ray Train: resources per worker, storage arguments
    errors    one line from what failed inside an actor or a training worker
    datasets  Ray Datasets over files the driver names (f2m_ray.synthetic.open_synthetic)

May import: f2m_ray.errors, f2m_ray.storage (and Ray). Imported by data, encode, evaluation, synth, train, synthetic.
"""
