{{- define "kf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kf.selector" -}}
app.kubernetes.io/name: {{ include "kf.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kf.secretName" -}}
{{- if .Values.existingSecret -}}{{ .Values.existingSecret }}{{- else -}}{{ include "kf.fullname" . }}{{- end -}}
{{- end -}}

{{- define "kf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "kf.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "kf.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Values that make no sense stop the render with a message naming them. */}}
{{- define "kf.validate" -}}
{{- if and (not .Values.existingSecret) (or (not .Values.database.url) (not .Values.amqp.url)) -}}
{{- fail "set database.url and amqp.url, or existingSecret naming a Secret with DATABASE_URL and AMQP_URL" -}}
{{- end -}}
{{- if and .Values.worker.keda.enabled (not .Values.worker.keda.hostFromSecretKey) -}}
{{- fail "worker.keda.enabled needs worker.keda.hostFromSecretKey: the Secret key holding the broker URL KEDA reads queue lengths from" -}}
{{- end -}}
{{- $drain := div (int (default "20000" .Values.config.SHUTDOWN_DEADLINE_MS)) 1000 -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) $drain) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds plus config.SHUTDOWN_DEADLINE_MS (%v s): the pod would be killed mid-drain" .Values.terminationGracePeriodSeconds (add (int .Values.preStopSleepSeconds) $drain)) -}}
{{- end -}}
{{- if not (has (default "classic" .Values.config.AMQP_QUEUE_TYPE) (list "classic" "quorum")) -}}
{{- fail (printf "config.AMQP_QUEUE_TYPE (%v) must be classic or quorum" .Values.config.AMQP_QUEUE_TYPE) -}}
{{- end -}}
{{- $shards := int (default "1" .Values.config.SHARD_COUNT) -}}
{{- if or (lt $shards 1) (gt $shards 256) -}}
{{- fail (printf "config.SHARD_COUNT (%v) must be 1 to 256" .Values.config.SHARD_COUNT) -}}
{{- end -}}
{{- if .Values.worker.shardGroups -}}
{{- $covered := dict -}}
{{- range $g := .Values.worker.shardGroups -}}
{{- range $s := $g -}}
{{- if ge (int $s) $shards -}}
{{- fail (printf "worker.shardGroups names shard %v, but config.SHARD_COUNT is %d (shards 0 to %d)" $s $shards (sub $shards 1)) -}}
{{- end -}}
{{- $_ := set $covered (toString (int $s)) true -}}
{{- end -}}
{{- end -}}
{{- range $s := until $shards -}}
{{- if not (hasKey $covered (toString $s)) -}}
{{- fail (printf "worker.shardGroups leaves shard %d without a worker: put it in a group" $s) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $store := list "database" "amqp" -}}
{{- $ca := (index $.Values $store).caCert | default dict -}}
{{- if and $ca.secret $ca.configMap -}}
{{- fail (printf "%s.caCert names a Secret and a ConfigMap: name one" $store) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.migrations.hook (not .Values.existingSecret) -}}
{{- fail "migrations.hook runs before the release's own Secret exists: use existingSecret, or migrations.hook=false" -}}
{{- end -}}
{{- end -}}

{{/* The worker Deployments, as JSON: one consuming every shard (`worker`), or one per
entry of worker.shardGroups (`worker-<i>`, with the shards it consumes). */}}
{{- define "kf.workerUnits" -}}
{{- $units := list -}}
{{- if .Values.worker.shardGroups -}}
{{- range $i, $g := .Values.worker.shardGroups -}}
{{- $units = append $units (dict "name" (printf "worker-%d" $i) "shards" $g "env" (dict "WORKER_SHARDS" (join "," $g))) -}}
{{- end -}}
{{- else -}}
{{- $units = list (dict "name" "worker" "shards" (until (int (default "1" .Values.config.SHARD_COUNT))) "env" dict) -}}
{{- end -}}
{{- toJson $units -}}
{{- end -}}

{{/* A shard's work queues, as a JSON list: `<prefix>.<kind>` with one shard,
`<prefix>.<kind>.s<i>` with several; with quorum queues one per priority level, that name
then `.p4` (CRITICAL) to `.p1` (LOW). Takes (dict "root" $ "kind" K "shard" I). */}}
{{- define "kf.workQueues" -}}
{{- $base := printf "%s.%s" .root.Values.config.AMQP_PREFIX .kind -}}
{{- if ne (int (default "1" .root.Values.config.SHARD_COUNT)) 1 -}}
{{- $base = printf "%s.s%d" $base (int .shard) -}}
{{- end -}}
{{- if eq (default "classic" .root.Values.config.AMQP_QUEUE_TYPE) "quorum" -}}
{{- toJson (list (printf "%s.p4" $base) (printf "%s.p3" $base) (printf "%s.p2" $base) (printf "%s.p1" $base)) -}}
{{- else -}}
{{- toJson (list $base) -}}
{{- end -}}
{{- end -}}

{{/* The pod spec every process shares: one image, its role as args, env from the
ConfigMap and the Secret, probes on the metrics port. */}}
{{- define "kf.pod" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "kf.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with include "kf.tlsVolumes" $root }}
volumes:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "kf.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args:
      {{- toYaml .args | nindent 6 }}
    envFrom:
      - configMapRef:
          name: {{ include "kf.fullname" $root }}
      - secretRef:
          name: {{ include "kf.secretName" $root }}
    env:
      - name: KONGFLOW_NO_MIGRATE
        value: "true"
      - name: METRICS_ADDR
        value: "0.0.0.0:{{ $root.Values.ports.metrics }}"
      {{- range $k, $v := .env }}
      - name: {{ $k }}
        value: {{ $v | quote }}
      {{- end }}
      {{- include "kf.tlsEnv" $root | nindent 6 }}
    {{- with include "kf.tlsMounts" $root }}
    volumeMounts:
      {{- . | nindent 6 }}
    {{- end }}
    ports:
      {{- if .http }}
      - name: http
        containerPort: {{ $root.Values.ports.http }}
      {{- end }}
      - name: metrics
        containerPort: {{ $root.Values.ports.metrics }}
    livenessProbe:
      httpGet: {path: /healthz, port: metrics}
      periodSeconds: 10
      failureThreshold: 3
    readinessProbe:
      httpGet: {path: /readyz, port: metrics}
      periodSeconds: 5
      failureThreshold: 2
    startupProbe:
      httpGet: {path: /healthz, port: metrics}
      periodSeconds: 2
      failureThreshold: 60
    lifecycle:
      preStop:
        sleep:
          seconds: {{ $root.Values.preStopSleepSeconds }}
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
{{- end -}}


{{/* TLS to the stores: each CA certificate named by database.caCert or amqp.caCert, from
a Secret or a ConfigMap, mounted read-only under /etc/kongflow/tls/<store>/ca.crt, and the
variables that point the process at it (PGSSLROOTCERT as libpq's, AMQP_TLS_CA_FILE);
database.sslMode as PGSSLMODE. Each takes the chart's root. */}}
{{- define "kf.tlsCAs" -}}
{{- $cas := list -}}
{{- range $store := list "database" "amqp" -}}
{{- $ca := (index $.Values $store).caCert | default dict -}}
{{- if or $ca.secret $ca.configMap -}}
{{- $dir := ternary "postgres" "amqp" (eq $store "database") -}}
{{- $env := ternary "PGSSLROOTCERT" "AMQP_TLS_CA_FILE" (eq $store "database") -}}
{{- $cas = append $cas (dict "name" (printf "%s-ca" $dir) "dir" (printf "/etc/kongflow/tls/%s" $dir) "env" $env "secret" $ca.secret "configMap" $ca.configMap "key" ($ca.key | default "ca.crt")) -}}
{{- end -}}
{{- end -}}
{{- toJson $cas -}}
{{- end -}}

{{- define "kf.tlsEnv" -}}
{{- with .Values.database.sslMode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
{{- range $ca := fromJsonArray (include "kf.tlsCAs" .) }}
- name: {{ $ca.env }}
  value: {{ printf "%s/ca.crt" $ca.dir | quote }}
{{- end }}
{{- end -}}

{{- define "kf.tlsMounts" -}}
{{- range $ca := fromJsonArray (include "kf.tlsCAs" .) }}
- name: {{ $ca.name }}
  mountPath: {{ $ca.dir }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "kf.tlsVolumes" -}}
{{- range $ca := fromJsonArray (include "kf.tlsCAs" .) }}
- name: {{ $ca.name }}
  {{- if $ca.secret }}
  secret:
    secretName: {{ $ca.secret }}
  {{- else }}
  configMap:
    name: {{ $ca.configMap }}
  {{- end }}
    items:
      - {key: {{ $ca.key | quote }}, path: ca.crt}
{{- end }}
{{- end -}}
