//! Scorers by name: the built-in ones under fixed ids, then any the program registers.

use crate::policy::ScorerId;
use crate::scorer::Scorer;
use crate::scorers;

/// Scorers by id and name: the built-in ones, then any registered by the program.
pub struct ScorerRegistry {
    entries: Vec<(String, Box<dyn Scorer>)>,
}

impl std::fmt::Debug for ScorerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Default for ScorerRegistry {
    fn default() -> Self {
        let builtins: [Box<dyn Scorer>; 8] = [
            Box::new(scorers::Cost),
            Box::new(scorers::Prefix),
            Box::new(scorers::Headroom),
            Box::new(scorers::Queue),
            Box::new(scorers::Requests),
            Box::new(scorers::Gpu),
            Box::new(scorers::KvUsage),
            Box::new(scorers::Waiting),
        ];
        Self {
            entries: ScorerId::BUILTIN
                .iter()
                .map(|n| n.to_string())
                .zip(builtins)
                .collect(),
        }
    }
}

impl ScorerRegistry {
    /// Adds a scorer under `name`; refused when the name is taken or the registry is full.
    pub fn register(&mut self, name: &str, scorer: Box<dyn Scorer>) -> Result<ScorerId, String> {
        if self.id(name).is_some() {
            return Err(format!("a scorer named {name:?} is already registered"));
        }
        let id = u16::try_from(self.entries.len())
            .map_err(|_| "too many scorers registered".to_string())?;
        self.entries.push((name.to_string(), scorer));
        Ok(ScorerId(id))
    }

    /// The id of the scorer named `name`.
    pub fn id(&self, name: &str) -> Option<ScorerId> {
        self.entries
            .iter()
            .position(|(n, _)| n == name)
            .and_then(|i| u16::try_from(i).ok())
            .map(ScorerId)
    }

    /// The name of scorer `id`.
    pub fn name(&self, id: ScorerId) -> Option<&str> {
        self.entries.get(usize::from(id.0)).map(|(n, _)| n.as_str())
    }

    pub(crate) fn get(&self, id: ScorerId) -> Option<&dyn Scorer> {
        self.entries.get(usize::from(id.0)).map(|(_, s)| s.as_ref())
    }
}
