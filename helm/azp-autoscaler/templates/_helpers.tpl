{{/* Chart name. */}}
{{- define "azp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "azp.fullname" -}}
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

{{/* Name of cluster-scoped objects: unique per release and namespace. */}}
{{- define "azp.clusterName" -}}
{{- printf "%s-%s" (include "azp.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "azp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels of every object, without a component. */}}
{{- define "azp.commonLabels" -}}
helm.sh/chart: {{ include "azp.chart" . }}
app.kubernetes.io/name: {{ include "azp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: azp-autoscaler
{{- end }}

{{/* Standard labels of the controller's objects. */}}
{{- define "azp.labels" -}}
{{ include "azp.commonLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/* Selector labels of the controller. */}}
{{- define "azp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "azp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/* The controller's ServiceAccount. */}}
{{- define "azp.serviceAccountName" -}}
{{- default (include "azp.fullname" .) .Values.controller.serviceAccount.name }}
{{- end }}

{{/* The controller image reference. */}}
{{- define "azp.controllerImage" -}}
{{- $img := .Values.controller.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
The controller's permissions on AgentPools, agent Jobs and Pods (patch: marking busy pods), the busy pods'
PodDisruptionBudgets, Secrets (PAT auth) and Events, wherever it
watches. The one list of rules: the end-to-end tests run the controller under exactly these
(tests/testbed/src/chart.rs renders them).
*/}}
{{- define "azp.controllerRules" -}}
- apiGroups: ["azp-autoscaler.dev"]
  resources: ["agentpools"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["azp-autoscaler.dev"]
  resources: ["agentpools/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["azp-autoscaler.dev"]
  resources: ["agentpools/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
What the uninstall hook's `azp-autoscaler drain` may do in the namespaces of the release's pools (the
e2e test runs it under exactly these rules: tests/testbed/src/chart.rs renders them).
*/}}
{{- define "azp.drainRules" -}}
- apiGroups: ["azp-autoscaler.dev"]
  resources: ["agentpools"]
  verbs: ["get", "list", "delete"]
{{- end }}

{{/* Namespaces that hold pools of this release (unique; the release namespace when there is no pool). */}}
{{- define "azp.poolNamespaces" -}}
{{- $namespaces := list }}
{{- if not .Values.pools }}
{{- $namespaces = list .Release.Namespace }}
{{- end }}
{{- range .Values.pools }}
{{- $namespaces = append $namespaces (default $.Release.Namespace .namespace) }}
{{- end }}
{{- $namespaces | uniq | toJson }}
{{- end }}

{{/* Checks across values that the schema cannot express; each message names the value and the fix. */}}
{{- define "azp.validate" -}}
{{- $wi := false }}
{{- range .Values.pools }}
{{- if not .pat }}{{ $wi = true }}{{ end }}
{{- if and (not .organization) (not $.Values.organization) }}
{{- fail (printf "pools[%s]: no organization: set the top-level `organization` (https://dev.azure.com/<org>) or pools[].organization" .name) }}
{{- end }}
{{- if and $.Values.watchNamespace (ne (default $.Release.Namespace .namespace) $.Values.watchNamespace) }}
{{- fail (printf "pools[%s]: namespace %q is not watched (watchNamespace: %q): put the pool in %q or clear watchNamespace" .name (default $.Release.Namespace .namespace) $.Values.watchNamespace $.Values.watchNamespace) }}
{{- end }}
{{- end }}
{{- if and $wi (not .Values.controller.workloadIdentity.clientId) }}
{{- fail "controller.workloadIdentity.clientId: required for pools that use workload identity: the client id of the controller's managed identity" }}
{{- end }}
{{- range .Values.pools }}
{{- $minIdle := int (ternary .minIdle $.Values.poolDefaults.minIdle (hasKey . "minIdle")) }}
{{- $maxAgents := int (ternary .maxAgents $.Values.poolDefaults.maxAgents (hasKey . "maxAgents")) }}
{{- if gt $minIdle $maxAgents }}
{{- fail (printf "pools[%s]: minIdle (%d) exceeds maxAgents (%d): lower minIdle or raise maxAgents" .name $minIdle $maxAgents) }}
{{- end }}
{{- end }}
{{- with .Values.serviceHooks }}
{{- if .enabled }}
{{- if not .existingSecret }}
{{- fail "serviceHooks.existingSecret: required with serviceHooks.enabled: the Secret holding the subscription's credentials (keys username and password, and/or token)" }}
{{- end }}
{{- if not (or .basicAuth .token) }}
{{- fail "serviceHooks: enable basicAuth or token (or both): the endpoint never runs without credentials" }}
{{- end }}
{{- if eq (int .port) (int $.Values.controller.adminPort) }}
{{- fail "serviceHooks.port: must differ from controller.adminPort (the hook port is the only one exposed outside)" }}
{{- end }}
{{- if and .ingress.enabled (not .ingress.host) }}
{{- fail "serviceHooks.ingress.host: required with serviceHooks.ingress.enabled" }}
{{- end }}
{{- end }}
{{- end }}
{{- $names := dict }}
{{- range .Values.pools }}
{{- $key := printf "%s/%s" (default $.Release.Namespace .namespace) .name }}
{{- if hasKey $names $key }}
{{- fail (printf "pools: %s appears twice: each pool needs its own name in its namespace" $key) }}
{{- end }}
{{- $_ := set $names $key true }}
{{- end }}
{{- end }}
