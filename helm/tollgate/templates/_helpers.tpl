{{/*
Names and labels.
*/}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.fullname" -}}
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

{{- define "tollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: tollgate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tollgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tollgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/* Where the admin token Secret is mounted, and the file the configuration reads. */}}
{{- define "tollgate.tlsDir" -}}/etc/tollgate/tls{{- end }}
{{- define "tollgate.adminTokenDir" -}}/var/run/secrets/tollgate{{- end }}
{{- define "tollgate.adminTokenFile" -}}{{ include "tollgate.adminTokenDir" . }}/admin-token{{- end }}

{{/*
A duration of the gateway configuration, in whole seconds rounded up (Pingora takes seconds).
Accepts the subset of humantime the schema allows: integers with ms, s, m or h, optionally
several ("1m 30s"). Call with (dict "value" "10s" "path" "config.server.grace_period").
*/}}
{{- define "tollgate.durationSeconds" -}}
{{- $raw := toString .value }}
{{- $s := regexReplaceAll "\\s+" $raw "" }}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h))+$" $s) }}
{{- fail (printf "%s: %q is not a duration the chart can check; write whole numbers with ms, s, m or h, e.g. 500ms, 10s, 1m 30s" .path $raw) }}
{{- end }}
{{- $unit := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+[a-z]+" $s -1 }}
{{- $ms = add $ms (mul (regexFind "^[0-9]+" . | atoi) (get $unit (regexFind "[a-z]+$" .))) }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/*
The seconds the pod needs to shut down cleanly, and the terminationGracePeriodSeconds to use:
the value given (checked), or that sum. Fails when a given value is too short.
*/}}
{{- define "tollgate.terminationGracePeriodSeconds" -}}
{{- $server := (.Values.config | default dict).server | default dict }}
{{- $grace := include "tollgate.durationSeconds" (dict "value" ($server.grace_period | default "10s") "path" "config.server.grace_period") | int }}
{{- $shutdown := include "tollgate.durationSeconds" (dict "value" ($server.graceful_shutdown_timeout | default "10s") "path" "config.server.graceful_shutdown_timeout") | int }}
{{- $preStop := .Values.preStopSeconds | int }}
{{- $margin := .Values.shutdownMarginSeconds | int }}
{{- $needed := add $preStop $grace $shutdown $margin }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $needed }}
{{- else }}
{{- $given := .Values.terminationGracePeriodSeconds | int }}
{{- if lt $given $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) is shorter than the shutdown it must cover: preStopSeconds (%d) + config.server.grace_period (%ds) + config.server.graceful_shutdown_timeout (%ds) + shutdownMarginSeconds (%d) = %d. Raise it to at least %d, shorten those, or leave terminationGracePeriodSeconds null to compute it." $given $preStop $grace $shutdown $margin $needed $needed) }}
{{- end }}
{{- $given }}
{{- end }}
{{- end }}

{{/*
The gateway configuration file: .Values.config plus the listener and admin sections the chart
owns. The ConfigMap and the checksum/config annotation both use this, byte for byte.
*/}}
{{- define "tollgate.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if hasKey $cfg "listeners" }}
{{- fail "config.listeners is set by the chart (listeners: [{address: 0.0.0.0:<ports.http>}]): remove it and set ports.http instead" }}
{{- end }}
{{- if hasKey $cfg "admin" }}
{{- fail "config.admin is set by the chart: set ports.admin for its address and admin.existingSecret / admin.secretKey for its token, and remove config.admin" }}
{{- end }}
{{- if eq (.Values.ports.http | int) (.Values.ports.admin | int) }}
{{- fail (printf "ports.http and ports.admin must differ (both %d): the admin listener cannot share the traffic port" (.Values.ports.http | int)) }}
{{- end }}
{{- range $name, $u := ($cfg.upstreams | default dict) }}
{{- if and (kindIs "map" $u) (kindIs "map" $u.retries) (hasKey $u.retries "true") }}
{{- fail (printf "config.upstreams.%s.retries has a key \"true\": YAML 1.1 (Helm's values parser) reads an unquoted on: as a boolean; write \"on\": [connect_error, reset]" $name) }}
{{- end }}
{{- end }}
{{- $listeners := list (dict "address" (printf "0.0.0.0:%d" (.Values.ports.http | int))) }}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.certificates }}
{{- fail "tls.enabled needs at least one entry in tls.certificates (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if or (eq (.Values.ports.https | int) (.Values.ports.http | int)) (eq (.Values.ports.https | int) (.Values.ports.admin | int)) }}
{{- fail (printf "ports.https (%d) must differ from ports.http and ports.admin" (.Values.ports.https | int)) }}
{{- end }}
{{- $certs := list }}
{{- range .Values.tls.certificates }}
{{- $c := dict "cert" (printf "%s/%s/tls.crt" (include "tollgate.tlsDir" $) .secretName) "key" (printf "%s/%s/tls.key" (include "tollgate.tlsDir" $) .secretName) }}
{{- with .names }}{{ $_ := set $c "names" . }}{{ end }}
{{- $certs = append $certs $c }}
{{- end }}
{{- $tls := dict "certificates" $certs "unknown_sni" .Values.tls.unknownSni "http2" .Values.tls.http2 }}
{{- $listeners = append $listeners (dict "address" (printf "0.0.0.0:%d" (.Values.ports.https | int)) "tls" $tls) }}
{{- end }}
{{- $_ := set $cfg "listeners" $listeners }}
{{- $admin := dict "address" (printf "0.0.0.0:%d" (.Values.ports.admin | int)) }}
{{- if .Values.admin.existingSecret }}
{{- $_ := set $admin "token_file" (include "tollgate.adminTokenFile" .) }}
{{- else }}
{{- /* Probes reach the admin listener on the pod IP, so it cannot be loopback. */}}
{{- $_ := set $admin "allow_insecure" true }}
{{- end }}
{{- with .Values.admin.readiness }}
{{- $_ := set $admin "readiness" . }}
{{- end }}
{{- $_ := set $cfg "admin" $admin }}
{{- toYaml $cfg }}
{{- end }}

{{/* Effective minimum pod count: what a PodDisruptionBudget protects. */}}
{{- define "tollgate.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas | int }}{{ else }}{{ .Values.replicaCount | int }}{{ end }}
{{- end }}
