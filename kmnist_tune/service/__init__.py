"""The service: storages and their retries, locks, studies, the worker loop and its slots, the
artifact store. Never imports torch, so commands that only read a study start fast.
"""
