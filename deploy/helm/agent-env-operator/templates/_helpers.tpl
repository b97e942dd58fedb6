{{/*
The app.kubernetes.io/name label.
*/}}
{{- define "agent-env-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: the release name unless overridden, so that a
release named agent-env gets deploy/base's names (agent-env-operator,
agent-env-builtin, agent-env-root, ...). Short enough for the longest
suffix (-operator-metrics) to keep a Service name within 63 characters.
*/}}
{{- define "agent-env-operator.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the Deployment, its roles and their bindings.
*/}}
{{- define "agent-env-operator.operatorName" -}}
{{- printf "%s-operator" (include "agent-env-operator.fullname" .) }}
{{- end }}

{{- define "agent-env-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "agent-env-operator.labels" -}}
helm.sh/chart: {{ include "agent-env-operator.chart" . }}
{{ include "agent-env-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agent-env
{{- end }}

{{/*
Labels that select the operator's pods.
*/}}
{{- define "agent-env-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-env-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-env-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agent-env-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "agent-env-operator.configMapName" -}}
{{- default (printf "%s-builtin" (include "agent-env-operator.fullname" .)) .Values.builtin.name }}
{{- end }}

{{- define "agent-env-operator.leaseName" -}}
{{- default (include "agent-env-operator.operatorName" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "agent-env-operator.envRootClaim" -}}
{{- default (printf "%s-root" (include "agent-env-operator.fullname" .)) .Values.envRoot.existingClaim }}
{{- end }}

{{- define "agent-env-operator.stateClaim" -}}
{{- default (printf "%s-state" (include "agent-env-operator.fullname" .)) .Values.state.sqlite.existingClaim }}
{{- end }}

{{- define "agent-env-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Refuses value combinations that would install an operator that cannot work.
Included by the Deployment, so every render checks.
*/}}
{{- define "agent-env-operator.validate" -}}
{{- $state := .Values.state.type }}
{{- if not (has $state (list "sqlite" "postgres")) }}
{{- fail (printf "state.type must be sqlite or postgres, not %q" $state) }}
{{- end }}
{{- if and (eq $state "sqlite") (gt (int .Values.replicas) 1) }}
{{- fail (printf "replicas is %d, but state.type sqlite allows one replica: the database sits on a ReadWriteOnce volume and takes one writer. Use state.type postgres for more replicas." (int .Values.replicas)) }}
{{- end }}
{{- if eq $state "postgres" }}
{{- if not .Values.state.postgres.existingSecret }}
{{- fail "state.type postgres needs state.postgres.existingSecret: the Secret holding the database URL (key state.postgres.key)" }}
{{- end }}
{{- if not .Values.masterKey.existingSecret }}
{{- fail "state.type postgres needs masterKey.existingSecret: every replica must open the store with the same master key. Create one: `agent-env secret keygen --out master.key && kubectl create secret generic agent-env-master-key --from-file=master.key`" }}
{{- end }}
{{- end }}
{{- if and (eq $state "sqlite") .Values.state.sqlite.existingClaim (eq .Values.state.sqlite.existingClaim (include "agent-env-operator.envRootClaim" .)) }}
{{- fail "state.sqlite.existingClaim is the env root's claim: SQLite's locks are not safe on a shared network volume; give the database a ReadWriteOnce claim of its own" }}
{{- end }}
{{- if not (has .Values.log.format (list "json" "text")) }}
{{- fail (printf "log.format must be json or text, not %q" .Values.log.format) }}
{{- end }}
{{- end }}
