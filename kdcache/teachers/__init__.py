"""Teachers that are not kdcache models: any ASE calculator (:mod:`kdcache.teachers.calculator`).

Kept apart from :mod:`kdcache.store` so that a calculator's worker process imports numpy and ASE
only, not torch and the store.
"""
