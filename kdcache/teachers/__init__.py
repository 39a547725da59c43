"""Teachers that are not kdcache models: any ASE calculator (:mod:`kdcache.teachers.calculator`),
any torch module with the adapter contract (:mod:`kdcache.teachers.adapter`), both written as
code specs (:mod:`kdcache.teachers.spec`); and hidden features of any torch teacher by module path
(:mod:`kdcache.teachers.hooks`).

Kept apart from :mod:`kdcache.store` so that a calculator's worker process imports numpy and ASE
only, not torch and the store.
"""
