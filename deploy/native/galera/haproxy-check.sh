#!/bin/sh
# HAProxy's external check for the billing database (see haproxy.cfg); exit 0 means "up".
# HAProxy calls it with: <proxy address> <proxy port> <server address> <server port>, and names
# the server in HAPROXY_SERVER_NAME. services/cli/galera.py renders this template.
case "$HAPROXY_SERVER_NAME" in
galera-replica)
    # The replica: it answers, and its replication SQL thread is running.
    sql="SELECT COUNT(*) FROM information_schema.GLOBAL_STATUS WHERE
         VARIABLE_NAME = 'SLAVES_RUNNING' AND VARIABLE_VALUE > 0"
    want=1
    ;;
*)
    # Synced (4) in the Primary component and ready for queries: three matching rows.
    sql="SELECT COUNT(*) FROM information_schema.GLOBAL_STATUS WHERE
         (VARIABLE_NAME = 'WSREP_LOCAL_STATE' AND VARIABLE_VALUE = '4')
      OR (VARIABLE_NAME = 'WSREP_CLUSTER_STATUS' AND VARIABLE_VALUE = 'Primary')
      OR (VARIABLE_NAME = 'WSREP_READY' AND VARIABLE_VALUE = 'ON')"
    want=3
    ;;
esac
got=$({mariadb} --no-defaults --protocol=tcp --host="$3" --port="$4" --user={check_user} \
    --connect-timeout=1 --batch --skip-column-names --execute="$sql" 2>/dev/null) || exit 1
[ "$got" = "$want" ]
