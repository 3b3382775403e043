"""What the tests share besides fixtures (fixtures stay in conftest.py): each module is imported
as ``from helpers.<module> import ...``, never ``from conftest import ...``.

- ``data``: the seed size every test agrees on and saving a trained model as an artifact;
- ``storage``: a fresh fake-gcs-server bucket;
- ``serving``: a migrated deployment with users, tokens and a champion, live servers, a TCP
  proxy that simulates an outage;
- ``browser``: Debian's Chromium through Playwright, signing in to the workbench;
- ``pg_cluster``: a private Postgres cluster a test may stop and start.
"""
