{{/* Names and labels, as the prometheus-community charts define them. */}}
{{- define "ftp-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ftp-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ftp-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels never carry the version: a Deployment's selector cannot change. */}}
{{- define "ftp-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ftp-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ftp-gateway.labels" -}}
helm.sh/chart: {{ include "ftp-gateway.chart" . }}
{{ include "ftp-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ftp-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ftp-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ftp-gateway.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Where the config file is mounted; the image's FTP_GATEWAY_CONFIG names the same path. */}}
{{- define "ftp-gateway.configDir" -}}/etc/ftp-gateway{{- end }}

{{/*
The passive range, checked once: every template that renders a passive port calls this first, so a
refused range fails `helm template` and `helm install` with one message.
*/}}
{{- define "ftp-gateway.validate" -}}
{{- $start := int .Values.passivePorts.start }}
{{- $end := int .Values.passivePorts.end }}
{{- if gt $start $end }}
{{- fail (printf "passivePorts.start (%d) is above passivePorts.end (%d)" $start $end) }}
{{- end }}
{{- $count := add1 (sub $end $start) }}
{{- if gt $count (int .Values.maxPassivePorts) }}
{{- fail (printf "passivePorts %d-%d is %d ports, more than maxPassivePorts (%d): every passive port is a Service port and a load-balancer listener (AWS NLB: 50 at most), so keep the range small or raise maxPassivePorts for a load balancer that takes more" $start $end $count (int .Values.maxPassivePorts)) }}
{{- end }}
{{- $control := int .Values.controlPort }}
{{- if and (ge $control $start) (le $control $end) }}
{{- fail (printf "controlPort %d lies inside passivePorts %d-%d" $control $start $end) }}
{{- end }}
{{- $admin := int .Values.adminPort }}
{{- if and (ge $admin $start) (le $admin $end) }}
{{- fail (printf "adminPort %d lies inside passivePorts %d-%d" $admin $start $end) }}
{{- end }}
{{- if and (eq .Values.service.type "NodePort") (or (lt $start 30000) (gt $end 32767)) }}
{{- fail (printf "service.type NodePort needs passivePorts inside the node-port range 30000-32767 (a client connects to the port PASV names), got %d-%d" $start $end) }}
{{- end }}
{{- $replicas := int .Values.replicaCount }}
{{- if and (or (gt $replicas 1) .Values.autoscaling.enabled) (not (include "ftp-gateway.hasRedis" .)) }}
{{- fail "replicaCount > 1 or autoscaling.enabled needs Redis, where the replicas share which passive port each one handed out: set redis.enabled=true, redis.url or redis.existingSecret" }}
{{- end }}
{{- if and (not .Values.existingSecret) (not .Values.database.url) }}
{{- fail "database.url is empty: give the user database's URL, or existingSecret with a database-url key" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if and (not .Values.tls.existingSecret) (not .Values.tls.certManager.enabled) }}
{{- fail "tls.enabled needs the certificate's Secret: tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (or (not .Values.tls.certManager.issuerRef.name) (not .Values.tls.certManager.dnsNames)) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name and tls.certManager.dnsNames" }}
{{- end }}
{{- end }}
{{- if or .Values.tls.required .Values.tls.implicitPort }}
{{- if not .Values.tls.enabled }}
{{- fail "tls.required and tls.implicitPort need tls.enabled (and a certificate)" }}
{{- end }}
{{- end }}
{{- with .Values.tls.implicitPort }}
{{- $implicit := int . }}
{{- if or (eq $implicit $control) (eq $implicit $admin) (and (ge $implicit $start) (le $implicit $end)) }}
{{- fail (printf "tls.implicitPort %d is the control port, the admin port or inside passivePorts %d-%d" $implicit $start $end) }}
{{- end }}
{{- end }}
{{- if ne (empty .Values.s3.accessKeyId) (empty .Values.s3.secretAccessKey) }}
{{- fail "give both s3.accessKeyId and s3.secretAccessKey, or neither (then the AWS chain: IRSA or the node's role)" }}
{{- end }}
{{- end }}

{{- define "ftp-gateway.hasRedis" -}}
{{- if or .Values.redis.enabled .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/* The passive ports, one per line: the Service, the containerPorts and config.toml all come from here. */}}
{{- define "ftp-gateway.passivePorts" -}}
{{- range $port := untilStep (int .Values.passivePorts.start) (int (add1 .Values.passivePorts.end)) 1 }}
{{ $port }}
{{- end }}
{{- end }}

{{/* The server's config.toml, from the values (the Secret carries what must not be in a ConfigMap). */}}
{{- define "ftp-gateway.config" -}}
{{- $passive := dict "port_min" (int .Values.passivePorts.start) "port_max" (int .Values.passivePorts.end) }}
{{- with .Values.masqueradeAddress }}{{ $_ := set $passive "masquerade_address" . }}{{ end }}
{{- $s3 := dict "addressing_style" .Values.s3.addressingStyle }}
{{- with .Values.s3.endpointUrl }}{{ $_ := set $s3 "endpoint_url" . }}{{ end }}
{{- with .Values.s3.region }}{{ $_ := set $s3 "region" . }}{{ end }}
{{- with .Values.s3.serverSideEncryption }}{{ $_ := set $s3 "server_side_encryption" . }}{{ end }}
{{- with .Values.s3.kmsKeyId }}{{ $_ := set $s3 "kms_key_id" . }}{{ end }}
{{- $cluster := dict "key_prefix" .Values.redis.keyPrefix }}
{{- if .Values.redis.enabled }}
{{- $_ := set $cluster "redis_url" (printf "redis://%s-redis:6379/0" (include "ftp-gateway.fullname" .)) }}
{{- end }}
{{- $config := dict
  "listen" (printf "0.0.0.0:%d" (int .Values.controlPort))
  "workers" (int .Values.workers)
  "passive" $passive
  "database" (dict "timeout" (float64 .Values.database.timeout))
  "storage" (dict "default_uri" .Values.storage.defaultUri)
  "s3" $s3
  "timeouts" (dict "drain" (float64 .Values.drainTimeout))
  "log" (dict "level" .Values.log.level "format" .Values.log.format "audit" .Values.log.audit)
  "admin" (dict "listen" (printf "0.0.0.0:%d" (int .Values.adminPort)))
  "proxy_protocol" (dict "trusted" .Values.proxyProtocol.trusted "required" .Values.proxyProtocol.required)
  "cluster" $cluster
}}
{{- if .Values.tls.enabled }}
{{- $dir := include "ftp-gateway.tlsDir" . }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) "required" .Values.tls.required "session_reuse" .Values.tls.sessionReuse }}
{{- with .Values.tls.implicitPort }}{{ $_ := set $tls "implicit_listen" (printf "0.0.0.0:%d" (int .)) }}{{ end }}
{{- $_ := set $config "tls" $tls }}
{{- end }}
{{- $config = mustMergeOverwrite $config (deepCopy .Values.config) }}
{{- toToml $config }}
{{- end }}

{{/* Where the TLS Secret is mounted (beside the config's ConfigMap, not inside it), and its name. */}}
{{- define "ftp-gateway.tlsDir" -}}/etc/ftp-gateway-tls{{- end }}

{{- define "ftp-gateway.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "ftp-gateway.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* The name of the Secret holding database-url and the S3 keys. */}}
{{- define "ftp-gateway.secretName" -}}
{{- default (include "ftp-gateway.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
The gateway's environment, shared by the Deployment and the migration Job (whose Secret is a hook copy:
`secretName` is passed in). Secrets come in as FTP_GATEWAY_* variables, which override config.toml.
*/}}
{{- define "ftp-gateway.env" -}}
{{- $root := .root -}}
- name: FTP_GATEWAY_CONFIG
  value: {{ include "ftp-gateway.configDir" $root }}/config.toml
- name: FTP_GATEWAY_DATABASE__URL
  valueFrom:
    secretKeyRef: {name: {{ .secretName }}, key: database-url}
- name: FTP_GATEWAY_S3__ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .secretName }}, key: s3-access-key-id, optional: true}
- name: FTP_GATEWAY_S3__SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .secretName }}, key: s3-secret-access-key, optional: true}
{{- if $root.Values.redis.existingSecret }}
- name: FTP_GATEWAY_CLUSTER__REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ $root.Values.redis.existingSecret }}, key: {{ $root.Values.redis.existingSecretKey }}}
{{- else if and $root.Values.redis.url (not $root.Values.redis.enabled) }}
- name: FTP_GATEWAY_CLUSTER__REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ include "ftp-gateway.fullname" $root }}-redis-url, key: redis-url}
{{- end }}
- name: FTP_GATEWAY_CLUSTER__NODE_ADDRESS
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The gateway pods only (not the Redis or migration pods of the same release). */}}
{{- define "ftp-gateway.gatewaySelectorLabels" -}}
{{ include "ftp-gateway.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}
