"""
`make e2e`: the provider on a real distributed Airflow, under kill -9.

Unit and behaviour tests run Airflow in one process (``dag.test()`` runs triggers in-line and a crash is a
raised exception). Users run a scheduler, a dag-processor, an api-server, Celery workers on Redis, two or more
triggerers and a PostgreSQL metadata database, and processes there die for real. This package stands that
deployment up on loopback (``deployment``), runs the provider's scenarios against fake OpenAI servers held in
this process (``scenarios``), and tears everything down by recorded pid. It is not part of ``make test``.
"""
