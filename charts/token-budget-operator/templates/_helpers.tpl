{{/*
Helpers, all namespaced by the chart name ("token-budget-operator.*").
*/}}

{{/* The chart name (nameOverride wins), at most 63 characters. */}}
{{- define "token-budget-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The object name prefix, at most 63 characters (DNS label). fullnameOverride wins; a release
whose name already contains the chart name is used as it is.
*/}}
{{- define "token-budget-operator.fullname" -}}
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

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "token-budget-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release namespace. */}}
{{- define "token-budget-operator.namespace" -}}
{{- .Release.Namespace }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "token-budget-operator.labels" -}}
helm.sh/chart: {{ include "token-budget-operator.chart" . }}
{{ include "token-budget-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: token-budget-operator
{{- end }}

{{/* Selector labels: stable across upgrades (never helm.sh/chart or the version). */}}
{{- define "token-budget-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-budget-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "token-budget-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "token-budget-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "token-budget-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The leader-election Lease (its name restricts the Role: resourceNames). */}}
{{- define "token-budget-operator.leaseName" -}}
{{- include "token-budget-operator.fullname" . }}
{{- end }}

{{/* The Secret of the self-managed webhook certificate (resourceNames in the Role). */}}
{{- define "token-budget-operator.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "token-budget-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The webhook configurations' name. Fixed in the operator
(token_budget.webhooks.configuration.NAME): one operator per cluster.
*/}}
{{- define "token-budget-operator.webhookConfigurationName" -}}
token-budget-operator
{{- end }}

{{/* The cert-manager Certificate (and its Secret) in certManager mode. */}}
{{- define "token-budget-operator.certificateName" -}}
{{- printf "%s-webhook" (include "token-budget-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Whether the operator writes its own webhook Secret and configurations. */}}
{{- define "token-budget-operator.selfManagedWebhooks" -}}
{{- if and .Values.webhooks.enabled (not .Values.webhooks.certManager.enabled) }}true{{ end }}
{{- end }}

{{/*
Namespaces that need a namespaced Role for Events in namespace-scoped mode: the watched ones,
"default" (the operator records Events about cluster-scoped objects there) and the release
namespace (kopf records its own Events about cluster-scoped objects in the pod's namespace).
*/}}
{{- define "token-budget-operator.eventNamespaces" -}}
{{- $all := concat .Values.watchNamespaces (list "default" .Release.Namespace) | uniq }}
{{- toJson $all }}
{{- end }}

{{/* Cross-field checks the schema cannot express; each failure says what to change. */}}
{{- define "token-budget-operator.validate" -}}
{{- if and .Values.webhooks.certManager.enabled (not .Values.webhooks.enabled) }}
{{- fail "webhooks.certManager.enabled=true needs webhooks.enabled=true" }}
{{- end }}
{{- if lt (int64 .Values.webhooks.caSeconds) (mul 2 (int64 .Values.webhooks.certificateSeconds)) }}
{{- fail "webhooks.caSeconds must be at least twice webhooks.certificateSeconds" }}
{{- end }}
{{- if and .Values.prometheus.ca.secretName .Values.prometheus.ca.configMapName }}
{{- fail "prometheus.ca: set secretName or configMapName, not both" }}
{{- end }}
{{- if and .Values.prometheus.basicAuth.username (not .Values.prometheus.basicAuth.passwordSecretName) }}
{{- fail "prometheus.basicAuth.username needs prometheus.basicAuth.passwordSecretName" }}
{{- end }}
{{- if and .Values.prometheus.bearerToken.secretName .Values.prometheus.basicAuth.username }}
{{- fail "prometheus: use bearerToken or basicAuth, not both" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) }}
{{- fail "podDisruptionBudget.minAvailable must be less than replicaCount, or no node could ever be drained" }}
{{- end }}
{{- end }}
