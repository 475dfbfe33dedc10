"""The offline tools: profile a model, then search the settings that suit it.

* :mod:`.profile` — :class:`~fastcache.tuning.profile.Profile` (EOC's prior and the
  per-step curves, their validation, atomic save / load);
* :mod:`.calibration` — :func:`~fastcache.tuning.calibration.calibrate` and
  :func:`~fastcache.tuning.calibration.recording` (uncached runs recorded);
* :mod:`.thresholds` — :func:`~fastcache.tuning.thresholds.search_threshold`;
* :mod:`.schedule_proxy` — the schedule search's Gram proxy and its dynamic program;
* :mod:`.schedule_search` — :func:`~fastcache.tuning.schedule_search.search_schedule`,
  the end-to-end search over the proxy's plans;
* :mod:`.evaluation` — running the user's runs, PSNR, computed fraction, progress;
* :mod:`.cli` / :mod:`.plots` — ``python -m fastcache.tuning`` and its figures.

This package imports none of them: the core (``fastcache.config``, the EOC and schedule
policies) imports :mod:`.profile` alone, and ``fastcache/__init__.py`` the public names.
"""
